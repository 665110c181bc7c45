"""The ring as torch custom ops: torch.compile traces a model that calls ring attention without a
graph break, eager runs the same ops.

`fa4_cp::ring_attention` runs a call in full (checks, transport, cross-rank check, plan, ring,
sinks) and returns out and the fp64 LSE the backward reads; `fa4_cp::ring_attention_backward`
runs the ring again from them, with the call the forward validated (call.py caches it).
`run_forward` / `run_backward` are the ring of a call already validated and agreed on, which
the 2-D call (mesh_attention.py) runs inside its own ops. What the schema cannot carry travels
as string handles (handles.py): the group as its process group's own name, a backend object
under a registered name. The fake implementations give the outputs' shapes from the inputs',
so new sequence lengths are symbolic, as for SDPA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .call import RingCall, validated_call
from .comm.group import RingGroup
from .consistency import check_consistency, count_call
from .handles import backend_of, group_by_name, hold_backend
from .kernels import AttentionBackend
from .kernels.interface import LSE_ACCUMULATOR_DTYPE
from .runtime.executor import Ring, ring_backward, ring_forward
from .plan.rows import rank_plan
from .sinks import add_sinks, sinks_grad

def prepared(
    q, k, v, cu_seqlens, sinks, group: str, causal: bool, window: list[int], softmax_scale: float | None, softcap, layout: str,
    backend, transport, deterministic: bool, grad: bool,
) -> tuple[RingCall, AttentionBackend, RingGroup]:
    """The validated call (call.py, cached: ValueError naming a bad argument, before any
    communication), its backend and its group."""
    ring_group = group_by_name(group)
    call, kernels = validated_call(
        q, k, v, cu_seqlens, sinks, ring_group.world_size, causal=causal, window=tuple(window), softmax_scale=softmax_scale,
        softcap=softcap, layout=layout, backend=backend_of(backend), transport=transport, backward=grad, deterministic=deterministic,
    )
    return call, kernels, ring_group


def run_forward(call: RingCall, kernels: AttentionBackend, group: RingGroup, q, k, v, sinks) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's dtype) and the fp64 LSE of a validated call that the ranks agreed on."""
    out_acc, lse = ring_forward(_ring(call, kernels, group, q), q, k, v)
    if sinks is not None:
        lse = add_sinks(out_acc, lse, sinks)
    return out_acc.to(q.dtype), lse


def run_backward(call: RingCall, kernels: AttentionBackend, group: RingGroup, q, k, v, out, lse, dout, dlse, sinks) -> tuple:
    """dq, dk, dv (q's, k's dtype) and the sinks' gradient (empty without sinks) of a validated call."""
    dout = dout.contiguous()  # a reduction's gradient arrives broadcast (stride 0); kernels need dense rows
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv = ring_backward(_ring(call, kernels, group, q), q, k, v, out, lse, dout, dlse)
    dsinks = q.new_empty(0) if sinks is None else sinks_grad(out, lse, dout, dlse, sinks, group)
    return dq.to(q.dtype), dk, dv, dsinks


def _ring(call: RingCall, kernels: AttentionBackend, group: RingGroup, q: torch.Tensor) -> Ring:
    transport = group.transport(call.transport, q.device)
    plan = rank_plan(call.sharding, call.mask, group.rank, q.device)
    return Ring(plan, transport, kernels, call.softmax_scale, call.softcap, call.deterministic)


def _lse_shape(q: torch.Tensor) -> tuple[int, ...]:
    """(b, h, s) for dense q (b, s, h, d); (h, total) for varlen q (total, h, d)."""
    return (*q.shape[:-3], q.shape[-2], q.shape[-3])


@torch.library.custom_op("fa4_cp::ring_attention", mutates_args=())
def ring_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None,
    group: str, causal: bool, window: list[int], softmax_scale: float | None, softcap: float | None, layout: str,
    backend: str | None, transport: str | None, deterministic: bool, grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's shape and dtype) and the final LSE in fp64, sinks included."""
    number = count_call(group_by_name(group))
    call, kernels, ring_group = prepared(
        q, k, v, cu_seqlens, sinks, group, causal, window, softmax_scale, softcap, layout, backend, transport, deterministic, grad,
    )
    check_consistency(ring_group, call, q.device, number, sinks)
    return run_forward(call, kernels, ring_group, q, k, v, sinks)


@ring_attention_op.register_fake
def _(q, k, v, cu_seqlens, sinks, group, causal, window, softmax_scale, softcap, layout, backend, transport, deterministic, grad):
    return torch.empty_like(q), q.new_empty(_lse_shape(q), dtype=LSE_ACCUMULATOR_DTYPE)


@torch.library.custom_op("fa4_cp::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    dlse: torch.Tensor | None, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None, group: str, causal: bool,
    window: list[int], softmax_scale: float | None, softcap: float | None, layout: str, backend: str | None,
    transport: str | None, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and the sinks' gradient of this rank's rows (empty without sinks)."""
    call, kernels, ring_group = prepared(
        q, k, v, cu_seqlens, sinks, group, causal, window, softmax_scale, softcap, layout, backend, transport, deterministic, True,
    )
    return run_backward(call, kernels, ring_group, q, k, v, out, lse, dout, dlse, sinks)


@ring_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, cu_seqlens, sinks, group, causal, window, softmax_scale, softcap, layout, backend, transport, deterministic):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


class RingSettings(NamedTuple):
    """The op's arguments after the tensors: what the backward replays, by name."""

    group: str
    causal: bool
    window: list[int]
    softmax_scale: float | None
    softcap: float | None
    layout: str
    backend: str | None
    transport: str | None
    deterministic: bool


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, sinks, *settings, _grad = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sinks)
    ctx.settings = RingSettings(*settings)
    hold_backend(ctx, ctx.settings.backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
    q, k, v, out, lse, cu_seqlens, sinks = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv, dsinks = ring_attention_backward_op(q, k, v, out, lse, dout, dlse, cu_seqlens, sinks, *ctx.settings)
    return dq, dk, dv, None, None if sinks is None else dsinks, *(None,) * (len(RingSettings._fields) + 1)


torch.library.register_autograd("fa4_cp::ring_attention", _backward, setup_context=_setup_context)

__all__ = ["prepared", "ring_attention_op", "ring_attention_backward_op", "run_backward", "run_forward"]
