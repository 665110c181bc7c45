"""Sharding a Hugging Face causal-LM batch for the ring: zigzag shards of input_ids, global
position_ids and pre-shifted labels, with packed documents detected from position_ids.

transformers' causal-LM loss shifts labels itself, which would cross shard boundaries; the
sharded batch carries `shift_labels` (shifted before sharding) and `num_items_in_batch` (the
global count of predicted tokens), so every rank's loss is its share of the global mean, and
summing gradients over the ring gives the unsharded gradients. It also carries `fa4_cp_shards`,
which the attention entry checks, so a model called on an unsharded batch raises.
"""

from __future__ import annotations

import torch

from ..comm.mesh import world_size_of
from ..shard import shard_inputs, shift_labels
from ._documents import IGNORE_INDEX, document_bounds
from .transformers import SHARDS_KEY, RingShards

def documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Global int32 cu_seqlens of packed documents (positions restart at 0), or None if the row is
    one sequence."""
    if position_ids.shape[0] != 1:
        raise ValueError(f"position_ids: packed documents need batch size 1, got shape {tuple(position_ids.shape)}")
    bounds = document_bounds(position_ids, rows_start_documents=False)
    if len(bounds) == 2 and int(bounds[0]) == 0:
        return None
    if len(bounds) == 1 or int(bounds[0]) != 0:
        raise ValueError("position_ids: the first token must have position 0")
    return bounds


def shard_batch(batch: dict[str, torch.Tensor], group: object = None, layout: str | None = None) -> dict[str, torch.Tensor]:
    """This rank's model inputs from a full causal-LM batch (input_ids, optional labels,
    position_ids and an all-ones attention_mask). `layout`: None for the defaults ("zigzag" for
    one sequence, "balanced" for packed documents), or one `shard` takes."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("attention_mask: padding is not supported under ring attention; pack documents instead")
    positions = batch.get("position_ids")
    cu_seqlens = documents_from_positions(positions) if positions is not None else None
    labels = batch.get("labels", input_ids)
    shifted = shift_labels(labels, cu_seqlens, ignore_index=IGNORE_INDEX)
    local = shard_inputs(input_ids, shifted, group=group, layout=layout, cu_seqlens=cu_seqlens, ignore_index=IGNORE_INDEX)
    sharded = {
        "input_ids": local["input_ids"],
        "position_ids": local["position_ids"],
        "labels": local["labels"],
        "shift_labels": local["labels"],
        "num_items_in_batch": (shifted != IGNORE_INDEX).sum(),
        SHARDS_KEY: RingShards(world_size_of(group), local["layout"], local["input_ids"].shape[-1]),
    }
    if cu_seqlens is not None:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        sharded.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
    return sharded
