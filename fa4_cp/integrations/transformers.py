"""fa4_cp ring attention as a transformers attention implementation.

    from fa4_cp.integrations.transformers import register_ring_attention
    name = register_ring_attention(group=mesh["cp"])           # "fa4_cp_ring"
    model = LlamaForCausalLM.from_pretrained(..., attn_implementation=name)

The name has no "flash" in it: transformers treats any implementation whose name contains
"flash" as a FlashAttention variant (padding-free paths, dtype checks), which this is not.
It registers no mask function, so transformers builds no mask for it; the inputs must come from
`shard_batch` (zigzag shards, global positions, pre-shifted labels, global cu_seq_lens for packed
documents). It refuses what it cannot honour: dropout, an explicit attention mask, and
sliding-window layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import ring_attention, ring_attention_varlen

ATTENTION_NAME = "fa4_cp_ring"


@dataclass(frozen=True)
class RingSetup:
    group: object = None
    layout: str = "zigzag"
    backend: str | None = None
    transport: str | None = None


_setup = RingSetup()


def register_ring_attention(group: object = None, *, backend: str | None = None, transport: str | None = None) -> str:
    """Register the attention with transformers and set the ring it runs on; returns its name."""
    from transformers import AttentionInterface

    global _setup
    _setup = RingSetup(group=group, backend=backend, transport=transport)
    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    return ATTENTION_NAME


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q, k, v (b, h, s, d) -> (out (b, s, h, d), None)."""
    _refuse_unsupported(module, query, key, attention_mask, dropout)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    options = dict(
        group=_setup.group, causal=getattr(module, "is_causal", True), softmax_scale=scaling,
        layout=_setup.layout, backend=_setup.backend, transport=_setup.transport,
    )
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return ring_attention(q, k, v, **options), None
    if kwargs.get("cu_seq_lens_k") is not None and not torch.equal(kwargs["cu_seq_lens_k"].cpu(), cu_seqlens.cpu()):
        raise ValueError(f"{ATTENTION_NAME}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over packed documents)")
    if q.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME}: packed documents (cu_seq_lens_q) need batch size 1, got {q.shape[0]}")
    out = ring_attention_varlen(q[0], k[0], v[0], cu_seqlens.to(device="cpu", dtype=torch.int32), **options)
    return out[None], None


def _refuse_unsupported(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float
) -> None:
    if key.shape[2] != query.shape[2]:
        # A KV cache prepends earlier keys; under checkpointing its recompute appends them twice.
        raise ValueError(
            f"{ATTENTION_NAME}: {key.shape[2]} keys for {query.shape[2]} queries; ring attention trains on whole "
            "sequences without a KV cache: pass use_cache=False (or set it in the model config)"
        )
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: dropout must be 0, got {dropout} (set the model config's attention_dropout to 0)")
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME}: an explicit attention mask of shape {tuple(attention_mask.shape)} is not supported; "
            "pack documents instead of padding (shard_batch turns position_ids into cu_seq_lens)"
        )
    if getattr(module, "sliding_window", None):
        raise ValueError(f"{ATTENTION_NAME}: sliding-window layers (sliding_window={module.sliding_window}) are not supported yet")
