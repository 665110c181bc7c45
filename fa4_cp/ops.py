"""Ring attention as one pair of torch custom ops, for a 1-D ring and a 2-D Ulysses x ring mesh
alike: torch.compile traces a model that calls it without a graph break, eager runs the same ops.

`fa4_cp::ring_attention` runs a call in full: it counts the call on its groups, prepares it
(call.py, cached: ValueError naming a bad argument, before any communication), has the ranks
check that they make the same call (consistency.py), then runs the ring (runtime/ring_run.py),
inside the Ulysses stage on a 2-D mesh (runtime/ulysses.py). It returns out, the LSE rounded
once and, on a 2-D mesh, the head-sharded tensors the backward reads (empty on a 1-D ring, whose
backward reads the inputs). `fa4_cp::ring_attention_backward` finds the forward's PreparedCall
in the cache (call.backward_prepared_call) and runs the ring backward. What the schema cannot carry travels as string handles
(handles.py): the groups and the RingOptions, in the forward as one call handle. The fake
implementations give every shape from the inputs', so new sequence lengths are symbolic, as for
SDPA.
"""

from __future__ import annotations

import torch

from .call import PreparedCall, backward_prepared_call, prepared_call
from .comm.mesh import UlyssesRing
from .consistency import check_consistency, count_call
from .handles import backend_of, call_of, group_by_name, options_of
from .kernels.interface import returned_lse_dtype
from .plan.head_chunks import HeadChunks
from .runtime.ring_run import ring_run_backward, ring_run_forward
from .runtime.ulysses import ulysses_backward, ulysses_forward

SAVED_ON_A_MESH = 5  # the head-sharded q, k, v, out and lse


def _prepared(q, k, v, cu_seqlens, sinks, ring: str, ulysses: str | None, options: str, backward: bool) -> PreparedCall:
    return prepared_call(
        q, k, v, cu_seqlens, sinks, options_of(options), ring_size=group_by_name(ring).world_size, ulysses_size=_ulysses_size(ulysses),
        backward=backward,
    )


def _ulysses_size(ulysses: str | None) -> int:
    return 1 if ulysses is None else group_by_name(ulysses).world_size


@torch.library.custom_op("fa4_cp::ring_attention", mutates_args=())
def ring_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None, call: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (q's shape with v's head_dim, q's dtype), the final LSE (sinks included; fp32 beside
    16-bit inputs: returned_lse_dtype), then what a 2-D call's backward reads (empty tensors on a
    1-D ring). `call`: handles.call_handle."""
    ring, ulysses, options, grad = call_of(call)
    groups = [group_by_name(name) for name in (ring, ulysses) if name is not None]
    numbers = [count_call(group) for group in groups]  # before any check: a refused call counts
    prepared = _prepared(q, k, v, cu_seqlens, sinks, ring, ulysses, options, grad)
    for group, number in zip(groups, numbers):  # on a mesh both dims agree, so every rank of it does
        check_consistency(group, prepared.call, q.device, number, sinks)
    if ulysses is None:
        out, lse = ring_run_forward(prepared.ring, prepared.kernels, groups[0], q, k, v, sinks)
        return out, lse, *(q.new_empty(0) for _ in range(SAVED_ON_A_MESH))
    return ulysses_forward(prepared, UlyssesRing(groups[1], groups[0]), q, k, v, sinks)


def _heads_shape(x: torch.Tensor, u: int, chunks: int, heads: int) -> tuple[int, ...]:
    """A 2-D call's head-sharded tensor, chunk first (runtime/ulysses.py)."""
    return (chunks, *x.shape[:-3], x.shape[-3] * u, heads, x.shape[-1])


@ring_attention_op.register_fake
def _(q, k, v, cu_seqlens, sinks, call):
    _, ulysses, options, _ = call_of(call)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((*q.shape[:-3], q.shape[-2], q.shape[-3]), dtype=returned_lse_dtype(q.dtype))
    if ulysses is None:
        return out, lse, *(q.new_empty(0) for _ in range(SAVED_ON_A_MESH))
    u = group_by_name(ulysses).world_size
    chunks = HeadChunks.of(q.shape[-2] // u, max(k.shape[-2] // u, 1), options_of(options).ulysses_chunks)
    heads_q, heads_out = (q.new_empty(_heads_shape(t, u, chunks.count, chunks.q_heads)) for t in (q, out))
    heads_k, heads_v = (t.new_empty(_heads_shape(t, u, chunks.kv_count, chunks.kv_heads)) for t in (k, v))
    heads_lse = q.new_empty((chunks.count, *q.shape[:-3], chunks.q_heads, q.shape[-3] * u), dtype=returned_lse_dtype(q.dtype))
    return out, lse, heads_q, heads_k, heads_v, heads_out, heads_lse


@torch.library.custom_op("fa4_cp::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    dlse: torch.Tensor | None, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None, ring: str, ulysses: str | None,
    options: str, kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and the sinks' gradient of this rank's rows (empty without sinks). q ... lse are
    the forward's inputs and outputs on a 1-D ring, its head-sharded tensors on a 2-D mesh."""
    prepared = backward_prepared_call(
        dout, q.shape[-1], kv_heads, k.shape[-1], v.shape[-1], cu_seqlens, sinks, options_of(options),
        ring_size=group_by_name(ring).world_size, ulysses_size=_ulysses_size(ulysses),
    )
    if ulysses is None:
        return ring_run_backward(prepared.ring, prepared.kernels, group_by_name(ring), q, k, v, out, lse, dout, dlse, sinks)
    mesh = UlyssesRing(group_by_name(ulysses), group_by_name(ring))
    return ulysses_backward(prepared, mesh, q, k, v, out, lse, dout, dlse, sinks, kv_heads)


@ring_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, cu_seqlens, sinks, ring, ulysses, options, kv_heads):
    dsinks = dout.new_empty(0) if sinks is None else torch.empty_like(sinks)
    dq = q.new_empty((*dout.shape[:-1], q.shape[-1]))
    dk, dv = (t.new_empty((*dout.shape[:-2], kv_heads, t.shape[-1])) for t in (k, v))
    return dq, dk, dv, dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, sinks, call = inputs
    ring, ulysses, options, _grad = call_of(call)
    out, lse, *heads_saved = output
    saved = (q, k, v, out, lse) if ulysses is None else heads_saved
    ctx.save_for_backward(*saved, cu_seqlens, sinks)
    ctx.out_shape, ctx.kv_heads, ctx.groups, ctx.options = out.shape, k.shape[-2], (ring, ulysses), options
    ctx.backend = backend_of(options_of(options).backend)  # a backend object made inline must outlive the forward
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None, *_saved_grads):
    *saved, cu_seqlens, sinks = ctx.saved_tensors
    dout = saved[0].new_zeros(ctx.out_shape) if dout is None else dout
    dq, dk, dv, dsinks = ring_attention_backward_op(*saved, dout, dlse, cu_seqlens, sinks, *ctx.groups, ctx.options, ctx.kv_heads)
    return dq, dk, dv, None, None if sinks is None else dsinks, None


torch.library.register_autograd("fa4_cp::ring_attention", _backward, setup_context=_setup_context)

__all__ = ["ring_attention_op", "ring_attention_backward_op"]
