"""Public entry points: ring attention over dense sequences and over packed (varlen) documents."""

from __future__ import annotations

import torch

from .autograd import RingAttentionFunction
from .consistency import check_consistency
from .kernels import AttentionBackend, BandMask, get_backend
from .parallel.executor import Ring
from .parallel.layout import get_layout
from .parallel.schedule import build_schedule
from .parallel.sharding import Sharding
from .parallel.transport import Transport, resolve_transport
from .validation import check_cu_seqlens, check_local_seq_len, check_mask, check_qkv, check_softmax_scale

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
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str | AttentionBackend | None = None,
    transport: str | None = None,
) -> Output:
    """Attention of this rank's shard of q against the whole sequence's k and v, around a ring.

    q (b, s_local, h, d), k and v (b, s_local, h_kv, d) hold this rank's tokens as `shard` lays
    them out (zigzag: chunks r and 2W-1-r of 2W). Returns out (b, s_local, h, d) and, with
    `return_lse`, lse (b, h, s_local) in fp32. `group`: None (the default process group), a
    ProcessGroup, a 1-D DeviceMesh or a SimulatedGroup. `window_size` is (left, right), -1 unbounded.
    `transport` ("auto", "nccl", "copy_engine"; default FA4_CP_TRANSPORT or "auto") picks how
    KV moves between GPUs. Under torch.compile this function is a graph break: the ring runs eagerly.
    """
    check_qkv(q, k, v, varlen=False)
    ring_transport = resolve_transport(group, transport, q.device)
    layout_ = get_layout(layout)
    check_local_seq_len(q.shape[1], layout_, ring_transport.world_size)
    sharding = Sharding.dense(q.shape[1] * ring_transport.world_size, ring_transport.world_size, layout_)
    return _run(q, k, v, sharding, ring_transport, causal, window_size, softmax_scale, return_lse, backend)


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
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str | AttentionBackend | None = None,
    transport: str | None = None,
) -> Output:
    """Ring attention over packed documents, each sharded on its own (see `shard_documents`).

    `cu_seqlens` is the global int32 boundaries of the unsharded documents, the same on every rank
    (a CPU tensor avoids a device sync). q (total_local, h, d), k and v (total_local, h_kv, d) hold
    this rank's slots, padding included. Returns out (total_local, h, d) and, with `return_lse`,
    lse (h, total_local); padding rows get out = 0 and lse = -inf.
    """
    check_qkv(q, k, v, varlen=True)
    doc_lengths = check_cu_seqlens(cu_seqlens)
    ring_transport = resolve_transport(group, transport, q.device)
    sharding = Sharding.documents(doc_lengths, ring_transport.world_size, get_layout(layout))
    if q.shape[0] != sharding.local_len:
        raise ValueError(
            f"cu_seqlens: its documents ({sum(doc_lengths)} tokens) take {sharding.local_len} local rows per rank "
            f"under the {layout} layout over {ring_transport.world_size} ranks, but q has {q.shape[0]}"
        )
    return _run(q, k, v, sharding, ring_transport, causal, window_size, softmax_scale, return_lse, backend)


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sharding: Sharding,
    transport: Transport,
    causal: bool,
    window_size: tuple[int, int],
    softmax_scale: float | None,
    return_lse: bool,
    backend: str | AttentionBackend | None,
) -> Output:
    window = check_mask(causal, window_size, varlen=sharding.varlen)
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    kernels = get_backend(backend, q)
    mask = BandMask.from_flags(causal, window)
    signature = (
        "varlen" if sharding.varlen else "dense",
        tuple(q.shape), tuple(k.shape), str(q.dtype), sharding.layout.name, sharding.world_size,
        hash(sharding.doc_lengths) if sharding.varlen else None, mask, scale, kernels.name, type(transport).__name__,
    )
    check_consistency(transport, signature, q.device)
    ring = Ring(sharding, build_schedule(sharding, mask), transport, kernels, scale)
    out, lse = RingAttentionFunction.apply(q, k, v, ring)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
