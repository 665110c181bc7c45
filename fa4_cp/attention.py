"""Public entry points: ring attention over dense sequences and over packed (varlen) documents.

A call descends once: api -> options -> op -> [Ulysses stage] -> cross-rank check -> plan ->
executor. Here the call's RingOptions are checked, once, and travel to the op as a handle
(options.py, handles.py; the op's schema would reject some with a TypeError, a ValueError names
them); inside the one custom op pair of ops.py, the tensors and documents are checked against the
groups' sizes, which needs no communication (call.py, once per call signature: the backward
reuses it); then the ranks check that they make the same call (consistency.py) and the ring runs
on the rank's cached plan (runtime/), between the Ulysses all-to-alls on a 2-D mesh.
torch.compile sees one op and no graph break.
"""

from __future__ import annotations

import torch

from .consistency import count_call
from .handles import backend_key, call_handle, group_by_name, options_handle, ring_and_ulysses_names
from .kernels import AttentionBackend
from .ops import EagerRingAttention, ring_attention_op, runs_eager
from .options import checked_options
from .validation import check_devices, check_flag

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


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
    deterministic: bool = False,
    ulysses_chunks: int = 1,
) -> Output:
    """Attention of this rank's shard of q against the whole sequence's k and v, around a ring.

    q (b, s_local, h, d), k and v (b, s_local, h_kv, d) hold this rank's tokens as `shard` lays
    them out (zigzag: chunks r and 2W-1-r of 2W). Returns out (b, s_local, h, d) and, with
    `return_lse`, lse (b, h, s_local): fp32, or fp64 for fp64 inputs. `group`: None (the default
    process group; without torch.distributed, a ring of one rank), a ProcessGroup, a 1-D
    DeviceMesh, a RingGroup such as a SimulatedRing's, or a 2-D DeviceMesh with dims "ulysses"
    and "ring" (or a SimulatedMesh's group): Ulysses x ring. `window_size` is (left, right), -1
    unbounded. `softcap` caps every score s = scale * q.k as softcap * tanh(s / softcap) (Gemma 2).
    `sinks` (h,) are per-head logits that join every row's softmax denominator with a zero value
    (gpt-oss); they are differentiable, and every rank must pass the same values (their gradient
    is summed over the ring and rounded once: ring rank 0 returns it, the others zeros, so the
    sum over ranks that FSDP/DDP make is the whole gradient, like any replicated weight's).
    The lse returned includes them. `transport` ("auto", "nccl", "copy_engine"; default
    FA4_CP_TRANSPORT or "auto") picks how KV moves between GPUs. `deterministic` sums every
    gradient in a fixed order, so that the same inputs give bitwise the same gradients on every
    run, whatever the timing (FlashAttention's flag, kept around the ring; slower: the default
    lets the kernels' atomic adds land in any order). `ulysses_chunks` (a 2-D mesh only) cuts
    each ulysses rank's heads into that many chunks, so that chunk i + 1's all-to-all runs behind
    chunk i's ring (on the copy-engine transport; NCCL's all-to-all runs at once); it must divide
    the rank's q heads and be a multiple or divisor of its KV heads (fa4_cp.plan_mesh suggests
    one). torch.compile traces it (fullgraph=True included) as one custom op.
    """
    return _run(
        q, k, v, None, sinks, group, causal, window_size, softmax_scale, softcap, layout, return_lse, backend, transport, deterministic,
        ulysses_chunks,
    )


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
    deterministic: bool = False,
    ulysses_chunks: int = 1,
) -> Output:
    """Ring attention over packed documents, laid out by `shard(..., cu_seqlens=...)`.

    `layout` "balanced" (default) keeps each document whole on one rank or splits it across the
    ring, balancing attention work (plan/placement.py); "zigzag" and "contiguous" cut every
    document on its own. Every document sees the same `window_size` in token offsets, whatever
    its chunk size. `softcap`, `sinks`, `deterministic` and `ulysses_chunks` as for `ring_attention`.

    `cu_seqlens` is the global int32 boundaries of the unsharded documents, the same on every rank
    (a CPU tensor avoids a device sync). q (total_local, h, d), k and v (total_local, h_kv, d) hold
    this rank's slots, padding included. Returns out (total_local, h, d) and, with `return_lse`,
    lse (h, total_local); padding rows get out = 0 and lse = -inf.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor, got {cu_seqlens!r}")
    return _run(
        q, k, v, cu_seqlens, sinks, group, causal, window_size, softmax_scale, softcap, layout, return_lse, backend, transport, deterministic,
        ulysses_chunks,
    )


def _run(
    q, k, v, cu_seqlens, sinks, group, causal, window_size, softmax_scale, softcap, layout, return_lse, backend, transport, deterministic,
    ulysses_chunks,
) -> Output:
    ring, ulysses = ring_and_ulysses_names(group)
    try:  # the options, once; the tensors and documents in the op (call.py)
        check_devices(q, k, v, sinks)  # tensors of other devices would reach the op's fake
        check_flag("return_lse", return_lse)
        options = options_handle(*checked_options(
            documents=cu_seqlens is not None, causal=causal, window_size=window_size, softmax_scale=softmax_scale, softcap=softcap,
            layout=layout, backend=backend_key(backend), transport=transport, deterministic=deterministic,
            ulysses_chunks=ulysses_chunks,
        ))
    except ValueError:  # a refused call counts, as the op counts its own (consistency.py)
        for name in (ring, ulysses) if ulysses is not None else (ring,):
            count_call(group_by_name(name))
        raise
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, sinks))
    run = EagerRingAttention.apply if runs_eager(q, k, v, cu_seqlens, sinks) else ring_attention_op
    out, lse, *_for_backward = run(q, k, v, cu_seqlens, sinks, call_handle(ring, ulysses, options, grad))
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
