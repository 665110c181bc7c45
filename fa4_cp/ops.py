"""Ring attention as one pair of torch custom ops, for a 1-D ring and a 2-D Ulysses x ring mesh
alike: torch.compile traces a model that calls it without a graph break. An eager call runs the
same bodies under a plain autograd.Function (`EagerRingAttention`), without the dispatcher's
layers; `runs_eager` says which way a call goes.

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
from torch.utils._device import DeviceContext

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


def _forward(
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


ring_attention_op = torch.library.custom_op("fa4_cp::ring_attention", _forward, mutates_args=())


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


def _backward_body(
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


ring_attention_backward_op = torch.library.custom_op("fa4_cp::ring_attention_backward", _backward_body, mutates_args=())


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


def _gradients(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None, run_backward) -> tuple:
    *saved, cu_seqlens, sinks = ctx.saved_tensors
    dout = saved[0].new_zeros(ctx.out_shape) if dout is None else dout
    dq, dk, dv, dsinks = run_backward(*saved, dout, dlse, cu_seqlens, sinks, *ctx.groups, ctx.options, ctx.kv_heads)
    return dq, dk, dv, None, None if sinks is None else dsinks, None


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None, *_saved_grads):
    return _gradients(ctx, dout, dlse, ring_attention_backward_op)


torch.library.register_autograd("fa4_cp::ring_attention", _backward, setup_context=_setup_context)


class EagerRingAttention(torch.autograd.Function):
    """The op pair's bodies under autograd without torch's dispatcher, for an eager call that no
    torch layer needs to see as an op (`runs_eager`). The custom op's own layers (the Autograd
    key's Python kernel and its redispatch, the dynamo-disabled wrapper, the outputs' aliasing
    check), once forward and once backward, are host time between the forward's kernel and the
    backward's first, which the GPU waits out at 8K tokens; upstream's flash_attn_func is an
    autograd.Function as well. The same bodies, saved context and formula as the op's."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, sinks, call):
        output = _forward(q, k, v, cu_seqlens, sinks, call)
        _setup_context(ctx, (q, k, v, cu_seqlens, sinks, call), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse, *_saved_grads):
        with torch.no_grad():
            gradients = _gradients(ctx, dout, dlse, _backward_body)
        if torch.is_grad_enabled():  # create_graph: as the op's (it registers no formula for its backward)
            return _SecondDerivativeRefused.marking(gradients, ctx.saved_tensors)
        return gradients


class _SecondDerivativeRefused(torch.autograd.Function):
    """Gradients that raise when differentiated again, so that a second derivative through ring
    attention is refused, never taken as zero. The forward's saved tensors join as inputs: the
    node lies on every path from the gradients to the call's inputs."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("fa4_cp.ring_attention has no second derivative: its backward is not differentiable")

    @staticmethod
    def marking(gradients: tuple, saved: tuple) -> tuple:
        present = [g for g in gradients if g is not None]
        anchors = [t for t in saved if t is not None and t.requires_grad]
        marked = iter(_SecondDerivativeRefused.apply(len(present), *present, *anchors))
        return tuple(None if g is None else next(marked) for g in gradients)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def runs_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may take `EagerRingAttention`: not under torch.compile (checked first, so
    that dynamo folds the rest away), no dispatch or function mode (fake tensors, FlopCounter,
    selective checkpointing, export), no functorch transform or jit trace, plain tensors off the
    meta device. Any of those sees the op instead. A default device (`torch.set_default_device`,
    `with torch.device(...)`) is a function mode that needs nothing of the op: it acts inside the
    bodies alike either way."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
        return False
    if torch._C._is_torch_function_mode_enabled() and not _only_a_default_device():
        return False
    return all(t is None or (type(t) in _PLAIN_TENSORS and not t.is_meta) for t in tensors)


def _only_a_default_device() -> bool:
    return all(isinstance(mode, DeviceContext) for mode in torch.overrides._get_current_function_mode_stack())


__all__ = ["EagerRingAttention", "ring_attention_op", "ring_attention_backward_op", "runs_eager"]
