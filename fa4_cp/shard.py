"""Sharding tensors and training inputs over a ring's ranks (the inverse: `unshard`).

Every rank passes the same full tensor to `shard` and keeps its own rows; no data moves.
`unshard` all-gathers the local rows and restores the global order. `group` is what ring
attention takes: a ring, or a 2-D Ulysses x ring mesh (plan/mesh_sharding.py lays tokens out for it).
"""

from __future__ import annotations

import torch

from .comm.group import resolve_group
from .comm.mesh import resolve_mesh, world_size_of
from .plan.mesh_sharding import mesh_sharding
from .plan.sharding import Sharding
from .plan.sharding_rows import ShardingRows
from .validation import check_cu_seqlens


def sharding_for(
    total_len: int, world_size: int, layout: str | None = None, cu_seqlens: torch.Tensor | None = None, ulysses: int = 1,
):
    """The dense sharding of `total_len` tokens (layout default "zigzag"), or the document
    sharding of `cu_seqlens` (default "balanced") over a ring of a `ulysses` x `world_size` mesh."""
    if cu_seqlens is None:
        return Sharding.dense(total_len, world_size, layout or "zigzag")
    doc_lengths = check_cu_seqlens(cu_seqlens)
    if sum(doc_lengths) != total_len:
        raise ValueError(f"cu_seqlens: expected to end at the {total_len} tokens of the tensor, got {sum(doc_lengths)}")
    return Sharding.documents(doc_lengths, world_size, layout or "balanced", ulysses)


def placement(group: object, total_len: int, layout: str | None, cu_seqlens: torch.Tensor | None) -> tuple[ShardingRows, int, object]:
    """(sharding, this rank's index in it, the group that gathers every rank's rows)."""
    mesh = resolve_mesh(group)
    if mesh is None:
        ring = resolve_group(group)
        return sharding_for(total_len, ring.world_size, layout, cu_seqlens), ring.rank, ring
    ring_sharding = sharding_for(total_len, mesh.ring.world_size, layout, cu_seqlens, mesh.ulysses.world_size)
    return mesh_sharding(ring_sharding, mesh.ulysses.world_size), mesh.rank, mesh


def shard(
    x: torch.Tensor,
    *,
    group: object = None,
    seq_dim: int = 1,
    layout: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    pad_value: float = 0,
) -> torch.Tensor:
    """This rank's rows of the full tensor `x` along `seq_dim`.

    Without `cu_seqlens`, the sequence is cut into chunks (`layout` "zigzag" by default, or
    "contiguous"). With `cu_seqlens` (global int32 document boundaries), `layout` "balanced"
    (default) keeps each document whole on one rank or splits it across the ring, "zigzag" and
    "contiguous" cut every document on its own; ranks are padded to equal rows, and padding slots
    hold `pad_value`.
    """
    _check_seq_dim(x, seq_dim, "x")
    sharding, rank, _ = placement(group, x.shape[seq_dim], layout, cu_seqlens)
    return sharding.shard(x, rank, seq_dim, pad_value)


def unshard(
    x_local: torch.Tensor,
    *,
    group: object = None,
    seq_dim: int = 1,
    layout: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full tensor from every rank's rows (an all-gather over `group`), padding dropped."""
    _check_seq_dim(x_local, seq_dim, "x_local")
    total = x_local.shape[seq_dim] * world_size_of(group) if cu_seqlens is None else sum(check_cu_seqlens(cu_seqlens))
    sharding, _, gatherer = placement(group, total, layout, cu_seqlens)
    if x_local.shape[seq_dim] != sharding.local_len:
        raise ValueError(f"x_local: expected {sharding.local_len} rows along dim {seq_dim}, got shape {tuple(x_local.shape)}")
    return sharding.unshard(gatherer.all_gather(x_local), seq_dim)


def _check_seq_dim(x: object, seq_dim: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or not -x.ndim <= seq_dim < x.ndim:
        raise ValueError(f"seq_dim: expected a dim of {name}'s {x.ndim} (from {-x.ndim} to {x.ndim - 1}), got {seq_dim!r}")


def shift_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels along the last dim, `ignore_index` at the end of every document.

    Shift before sharding: a token's successor may live on another rank.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[..., :-1] = input_ids[..., 1:]
    if cu_seqlens is not None:
        ends = torch.tensor(check_cu_seqlens(cu_seqlens)).cumsum(0) - 1
        labels[..., ends[ends >= 0]] = ignore_index
    return labels


def shard_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    group: object = None,
    layout: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """This rank's input_ids, pre-shifted labels and position_ids, all (batch, s_local), and the
    `layout` used (see `shard`).

    position_ids default to each token's global position (in its document, with `cu_seqlens`),
    as RoPE needs. Padding slots get input id 0, label `ignore_index` and position 0. With
    `cu_seqlens` the result also holds this rank's `local_cu_seqlens` and `local_seqused`.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    sharding, rank, _ = placement(group, input_ids.shape[-1], layout, cu_seqlens)
    seq_dim = input_ids.ndim - 1
    if position_ids is None:
        local_positions = sharding.positions(rank).to(input_ids.device).expand(*input_ids.shape[:-1], -1)
    else:
        local_positions = sharding.shard(position_ids, rank, seq_dim)
    local = {
        "input_ids": sharding.shard(input_ids, rank, seq_dim),
        "labels": sharding.shard(labels, rank, seq_dim, pad_value=ignore_index),
        "position_ids": local_positions,
        "layout": sharding.layout_name,
    }
    documents = None if cu_seqlens is None else sharding.local_documents(rank)  # a ring rank's (not on a 2-D mesh)
    if documents is not None:
        local["local_cu_seqlens"], local["local_seqused"] = documents
    return local
