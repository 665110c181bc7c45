"""fa4_cp ring attention in torchtitan's models (0.3.0): an inner attention, the model-config
converter that installs it, and the batch sharding it reads.

    from torchtitan.models import llama3
    from fa4_cp.integrations.torchtitan import RingAttentionConverter, shard_titan_batch

    spec = llama3.model_registry("8B", converters=[RingAttentionConverter.Config()])
    model = spec.model.build()
    local = shard_titan_batch(tokens, labels, positions, group=mesh["cp"])    # positions: per document; or a 2-D mesh
    logits = model(local.tokens, local.positions, local.attention_masks)

torchtitan's own context parallelism refuses varlen attention and packed documents; here each
layer's attention runs on fa4_cp's ring over the cp group, dense sequences (zigzag) and packed
documents (balanced layout) alike. The converter is torchtitan's extension point for model
configs (as its LoRA and quantization converters are): it swaps every layer's inner attention,
keeping a varlen layer's window, and refuses attention it does not know. A layer's
`out_transform(out, lse)` (gpt-oss applies its sinks so) gets the ring's out and lse.
`shard_titan_batch` puts the ring's facts (group, global documents, layout) into `attention_masks`,
which torchtitan passes to every inner attention unchanged; a layer called on a batch it did not
shard, on a ring of more than one rank, raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention, VarlenAttention
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

from ..attention import ring_attention, ring_attention_varlen
from ..comm.group import resolve_group
from ..comm.mesh import world_size_of
from ..shard import placement
from ._documents import IGNORE_INDEX, document_bounds
from .splits import ContextSplits

BLOCK_CAUSAL_FLEX_MODELS = ("Llama3Model.Config", "Qwen3Model.Config")


@dataclass(frozen=True)
class RingMasks:
    """What `shard_titan_batch` made of a batch, as the `attention_masks` of torchtitan's model."""

    group: object
    world_size: int
    local_len: int
    cu_seqlens: torch.Tensor | None  # global document boundaries (CPU int32); None: dense sequences
    layout: str
    ulysses_chunks: int = 1  # a 2-D split's head chunks: a ContextSplits' choice for the batch


@dataclass(frozen=True)
class RingBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    attention_masks: RingMasks
    num_tokens: int
    """Predicted tokens of the whole batch, over every rank: divide the summed loss by it."""


def shard_titan_batch(
    tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None, *, group: object = None,
    layout: str | None = None,
) -> RingBatch:
    """This rank's share of a torchtitan batch (tokens and labels (b, s), labels already shifted,
    as torchtitan's dataloaders give them). `positions` restarting at 0 mark packed documents:
    the batch is then packed into one row of documents (balanced layout by default), padding
    slots labelled IGNORE_INDEX. Without them each sequence is cut zigzag. Positions are global.
    `group` may be a ContextSplits (integrations/splits.py): the batch then runs on the split
    (and head chunks) predicted fastest for its documents, which the layers read from
    `attention_masks`."""
    if tokens.shape != labels.shape or tokens.ndim != 2:
        raise ValueError(f"labels: expected the (batch, seq) shape of tokens {tuple(tokens.shape)}, got {tuple(labels.shape)}")
    if positions is not None and positions.shape != tokens.shape:
        raise ValueError(f"positions: expected the shape of tokens {tuple(tokens.shape)}, got {tuple(positions.shape)}")
    num_tokens = int((labels != IGNORE_INDEX).sum())
    # packed: the batch's documents in one row, every sample starting one
    cu_seqlens = None if positions is None else document_bounds(positions, rows_start_documents=True)
    chunks = 1
    if isinstance(group, ContextSplits):
        _, group, chunks = group.choose(cu_seqlens, tokens.shape[1] if positions is None else tokens.numel())
    if positions is None:
        sharding, rank, _ = placement(group, tokens.shape[1], layout or "zigzag", None)
        local_positions = sharding.positions(rank).to(tokens.device).expand(tokens.shape[0], -1)
    else:
        tokens, labels = tokens.reshape(1, -1), labels.reshape(1, -1)
        sharding, rank, _ = placement(group, tokens.shape[1], layout or "balanced", cu_seqlens)
        local_positions = sharding.positions(rank).to(tokens.device)[None]
    local_tokens = sharding.shard(tokens, rank, seq_dim=1)
    local_labels = sharding.shard(labels, rank, seq_dim=1, pad_value=IGNORE_INDEX)
    masks = RingMasks(group, world_size_of(group), local_tokens.shape[1], cu_seqlens, sharding.layout_name, chunks)
    return RingBatch(local_tokens, local_labels, local_positions, masks, num_tokens)


class RingAttention(Module):
    """torchtitan's inner-attention interface, (b, s, h, d) in and out, on fa4_cp's ring."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        window_size: tuple[int, int] = (-1, 0)
        """(left, right) tokens around each query, -1 unbounded; (-1, 0) is causal."""
        backend: str | None = None
        transport: str | None = None
        deterministic: bool = False
        """Bitwise-reproducible gradients (set it with torchtitan's debug.deterministic)."""

    def __init__(self, config: Config):
        super().__init__()
        self.window_size, self.backend, self.transport = tuple(config.window_size), config.backend, config.transport
        self.deterministic = config.deterministic

    def forward(
        self, q_BLNH: torch.Tensor, k_BLNH: torch.Tensor, v_BLNH: torch.Tensor, *, attention_masks: RingMasks | None = None,
        scale: float | None = None, enable_gqa: bool = False,
        out_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, **kwargs,
    ) -> torch.Tensor:
        """`out_transform(out_BLNH, lse_BLN)`, as torchtitan's varlen and flex attentions take it
        (gpt-oss applies its sinks so), is applied to the ring's out and lse: both are per row."""
        if kwargs:
            raise ValueError(f"fa4_cp RingAttention: arguments {sorted(kwargs)} are not supported; refusing rather than dropping them")
        masks = self._masks(attention_masks, q_BLNH.shape[1])
        left, right = self.window_size
        options = dict(
            group=masks.group, causal=right == 0, window_size=(left, right), softmax_scale=scale,
            layout=masks.layout, backend=self.backend, transport=self.transport, deterministic=self.deterministic,
            ulysses_chunks=masks.ulysses_chunks, return_lse=out_transform is not None,
        )
        if masks.cu_seqlens is None:
            result = ring_attention(q_BLNH, k_BLNH, v_BLNH, **options)
        else:
            if q_BLNH.shape[0] != 1:
                raise ValueError(f"fa4_cp RingAttention: packed documents take one row, got batch {q_BLNH.shape[0]}")
            result = ring_attention_varlen(q_BLNH[0], k_BLNH[0], v_BLNH[0], masks.cu_seqlens, **options)
            result = tuple(t[None] for t in result) if out_transform is not None else result[None]
        if out_transform is None:
            return result
        out, lse = result
        return out_transform(out, lse.transpose(-1, -2))

    @staticmethod
    def _masks(masks: RingMasks | None, seq_len: int) -> RingMasks:
        if masks is None and resolve_group(None).world_size == 1:
            return RingMasks(None, 1, seq_len, None, "zigzag")  # a ring of one: the batch is its own shard
        if not isinstance(masks, RingMasks):
            raise ValueError(
                "fa4_cp RingAttention: the model got attention_masks that fa4_cp.integrations.torchtitan.shard_titan_batch "
                f"did not make ({type(masks).__name__}); shard each batch with it and pass its attention_masks"
            )
        if masks.local_len != seq_len:
            raise ValueError(f"fa4_cp RingAttention: the batch was sharded into {masks.local_len} local tokens, the layer got {seq_len}")
        return masks


class RingAttentionConverter(ModelConfigConverter):
    """Swap every layer's inner attention for `RingAttention`. Varlen attention keeps its window;
    SDPA becomes a causal ring; flex attention becomes one in the models whose flex masks are
    block-causal only (Llama 3, Qwen 3: other models build sliding windows into theirs, which the
    config does not show). Anything else is refused."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        backend: str | None = None
        transport: str | None = None
        deterministic: bool = False

    def __init__(self, config: Config):
        self.backend, self.transport, self.deterministic = config.backend, config.transport, config.deterministic

    def convert(self, model_config: Module.Config) -> Module.Config:
        block_causal_flex = type(model_config).__qualname__ in BLOCK_CAUSAL_FLEX_MODELS
        for index, layer in enumerate(model_config.layers):
            attention = getattr(layer, "attention", None)
            inner = getattr(attention, "inner_attention", None)
            if isinstance(inner, VarlenAttention.Config):
                window = tuple(inner.window_size)
            elif isinstance(inner, ScaledDotProductAttention.Config) or (block_causal_flex and isinstance(inner, FlexAttention.Config)):
                window = (-1, 0)
            else:
                raise ValueError(f"layers[{index}]: inner attention {type(inner).__qualname__} cannot be put on the ring")
            attention.inner_attention = RingAttention.Config(
                window_size=window, backend=self.backend, transport=self.transport, deterministic=self.deterministic,
            )
        return model_config
