"""Ring attention over a 2-D mesh as torch custom ops, as ops.py makes the 1-D ring: torch.compile
traces a model on a Ulysses x ring mesh without a graph break, eager runs the same ops.

`fa4_cp::mesh_attention` runs mesh_attention.mesh_forward (checks, all-to-all, ring, all-to-all)
and returns out and lse with the head-sharded tensors its backward reads;
`fa4_cp::mesh_attention_backward` runs mesh_backward. The two dims travel as group names. The
fake implementations give every shape from the inputs': the head-sharded tensors hold u x the
local rows, whatever the documents.
"""

from __future__ import annotations

import torch

from .handles import group_by_name, hold_backend
from .kernels.interface import LSE_ACCUMULATOR_DTYPE
from .mesh_attention import mesh_backward, mesh_forward
from .ops import RingSettings


mesh_attention_op = torch.library.custom_op("fa4_cp::mesh_attention", mutates_args=())(mesh_forward)


def _heads_shape(x: torch.Tensor, u: int, heads: int) -> tuple[int, ...]:
    return (*x.shape[:-3], x.shape[-3] * u, heads, x.shape[-1])


@mesh_attention_op.register_fake
def _(q, k, v, cu_seqlens, sinks, ulysses, ring, causal, window, softmax_scale, softcap, layout, backend, transport, deterministic, grad):
    u = group_by_name(ulysses).world_size
    heads, kv_local = q.shape[-2] // u, max(k.shape[-2] // u, 1)
    heads_q = q.new_empty(_heads_shape(q, u, heads))
    heads_kv = [k.new_empty(_heads_shape(k, u, kv_local)) for _ in range(2)]
    lse = q.new_empty((*q.shape[:-3], q.shape[-2], q.shape[-3]), dtype=LSE_ACCUMULATOR_DTYPE)
    heads_lse = q.new_empty((*q.shape[:-3], heads, q.shape[-3] * u), dtype=LSE_ACCUMULATOR_DTYPE)
    return torch.empty_like(q), lse, heads_q, *heads_kv, torch.empty_like(heads_q), heads_lse


mesh_attention_backward_op = torch.library.custom_op("fa4_cp::mesh_attention_backward", mutates_args=())(mesh_backward)


@mesh_attention_backward_op.register_fake
def _(
    heads_q, heads_k, heads_v, heads_out, heads_lse, dout, dlse, cu_seqlens, sinks, kv_heads, ulysses, ring, causal, window, softmax_scale,
    softcap, layout, backend, transport, deterministic,
):
    kv_shape = (*dout.shape[:-2], kv_heads, dout.shape[-1])
    dsinks = dout.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(dout), heads_k.new_empty(kv_shape), heads_v.new_empty(kv_shape), dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, sinks, *settings, _grad = inputs
    _out, _lse, *saved = output
    ctx.save_for_backward(*saved, cu_seqlens, sinks)
    ulysses, *ring_settings = settings  # the ring dim's name, then the 1-D op's settings
    ctx.q_shape, ctx.kv_heads, ctx.ulysses, ctx.settings = q.shape, k.shape[-2], ulysses, RingSettings(*ring_settings)
    hold_backend(ctx, ctx.settings.backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None, *_saved_grads):
    *saved, cu_seqlens, sinks = ctx.saved_tensors
    dout = saved[0].new_zeros(ctx.q_shape) if dout is None else dout
    dq, dk, dv, dsinks = mesh_attention_backward_op(*saved, dout, dlse, cu_seqlens, sinks, ctx.kv_heads, ctx.ulysses, *ctx.settings)
    return dq, dk, dv, None, None if sinks is None else dsinks, *(None,) * (len(RingSettings._fields) + 2)


torch.library.register_autograd("fa4_cp::mesh_attention", _backward, setup_context=_setup_context)

__all__ = ["mesh_attention_op", "mesh_attention_backward_op"]
