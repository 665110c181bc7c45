"""Public entry points: ring attention over dense sequences and over packed (varlen) documents.

A call runs in this order: every argument is checked (call.py) against the group's size, which
needs no communication; then the group's transport is made or reused (possibly collective), the
ranks check that they make the same call (consistency.py), the rank's cached plan is looked up,
and the ring runs (parallel/executor.py) under autograd.
"""

from __future__ import annotations

import torch

from .autograd import RingAttentionFunction
from .call import RingCall, dense_call, varlen_call
from .comm.group import RingGroup, resolve_group
from .consistency import check_consistency
from .kernels import AttentionBackend
from .parallel.executor import Ring
from .plan.rows import rank_plan

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@torch.compiler.disable
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: object = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str | AttentionBackend | None = None,
    transport: str | None = None,
) -> Output:
    """Attention of this rank's shard of q against the whole sequence's k and v, around a ring.

    q (b, s_local, h, d), k and v (b, s_local, h_kv, d) hold this rank's tokens as `shard` lays
    them out (zigzag: chunks r and 2W-1-r of 2W). Returns out (b, s_local, h, d) and, with
    `return_lse`, lse (b, h, s_local): fp32, or fp64 for fp64 inputs. `group`: None (the default
    process group; without torch.distributed, a ring of one rank), a ProcessGroup, a 1-D
    DeviceMesh or a RingGroup such as a SimulatedRing's. `window_size` is (left, right), -1
    unbounded. `softcap` caps every score s = scale * q.k as softcap * tanh(s / softcap) (Gemma 2).
    `sinks` (h,) are per-head logits that join every row's softmax denominator with a zero value
    (gpt-oss); they are differentiable, and every rank must pass the same values (each rank's
    gradient covers its own rows, summed across the ring like any replicated weight's).
    The lse returned includes them. `transport` ("auto", "nccl", "copy_engine"; default
    FA4_CP_TRANSPORT or "auto") picks how KV moves between GPUs. Under torch.compile this
    function is a graph break.
    """
    ring_group = resolve_group(group)
    call, kernels = dense_call(
        q, k, v, ring_group.world_size, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
        softcap=softcap, sinks=sinks, layout=layout, return_lse=return_lse, backend=backend, transport=transport,
    )
    return run_call(call, kernels, ring_group, q, k, v, sinks, return_lse)


@torch.compiler.disable
def ring_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group: object = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    layout: str = "balanced",
    return_lse: bool = False,
    backend: str | AttentionBackend | None = None,
    transport: str | None = None,
) -> Output:
    """Ring attention over packed documents, laid out by `shard(..., cu_seqlens=...)`.

    `layout` "balanced" (default) keeps each document whole on one rank or splits it across the
    ring, balancing attention work (plan/placement.py); "zigzag" and "contiguous" cut every
    document on its own. Every document sees the same `window_size` in token offsets, whatever
    its chunk size. `softcap` and `sinks` as for `ring_attention`.

    `cu_seqlens` is the global int32 boundaries of the unsharded documents, the same on every rank
    (a CPU tensor avoids a device sync). q (total_local, h, d), k and v (total_local, h_kv, d) hold
    this rank's slots, padding included. Returns out (total_local, h, d) and, with `return_lse`,
    lse (h, total_local); padding rows get out = 0 and lse = -inf.
    """
    ring_group = resolve_group(group)
    call, kernels = varlen_call(
        q, k, v, cu_seqlens, ring_group.world_size, causal=causal, window_size=window_size,
        softmax_scale=softmax_scale, softcap=softcap, sinks=sinks, layout=layout, return_lse=return_lse,
        backend=backend, transport=transport,
    )
    return run_call(call, kernels, ring_group, q, k, v, sinks, return_lse)


def run_call(
    call: RingCall, kernels: AttentionBackend, group: RingGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    sinks: torch.Tensor | None, return_lse: bool,
) -> Output:
    """Run a validated call: transport, cross-rank check, plan, ring."""
    transport = group.transport(call.transport, q.device)
    check_consistency(group, call, q.device)
    plan = rank_plan(call.sharding, call.mask, group.rank, q.device)
    ring = Ring(plan, transport, kernels, call.softmax_scale, call.softcap)
    out, lse = RingAttentionFunction.apply(q, k, v, sinks, ring)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
