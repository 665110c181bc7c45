"""RingCall: the validated arguments of one ring attention call.

A call is checked in full before anything communicates: the scalar options at the entry point
(attention.py), then here the tensors, layout, documents, backend and transport, against the
group's world size (which needs no communication), once per call signature (`validated_call`).
The frozen RingCall that comes out holds everything every rank must agree on, so it is also the
cross-rank signature (`digest`) and, with the rank, the key of the rank's cached plan. What may
differ between ranks (the tensors' values) is not in it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import threading
from dataclasses import dataclass

import torch

from .comm.transport import TransportKind
from .kernels import AttentionBackend, BandMask, get_backend
from .plan.layout import get_layout
from .plan.sharding import Sharding
from .validation import check_cu_seqlens, check_qkv, check_sinks, check_transport


@dataclass(frozen=True)
class RingCall:
    varlen: bool
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    dtype: torch.dtype
    sharding: Sharding
    """Layout, ring size and documents: who holds which tokens."""
    mask: BandMask
    softmax_scale: float
    softcap: float | None
    sinks: tuple[int, ...] | None
    """The sinks' shape: their values need not match in the check, but every rank must pass the
    same ones (a model's parameter is)."""
    backend: str
    transport: TransportKind
    """As asked ("auto" is resolved by the group, the same way on every rank)."""
    ulysses: int = 1
    """Ranks of the Ulysses head all-to-all around the ring (a 2-D mesh); 1 for a plain ring."""
    deterministic: bool = False
    """Gradients summed in a fixed order, bitwise reproducible."""

    @functools.cached_property
    def digest(self) -> int:
        """A 63-bit hash of the call, equal on every rank that makes the same call."""
        digest = hashlib.blake2b(repr(self).encode(), digest_size=8).digest()  # repr: every field, no address
        return int.from_bytes(digest, "little") >> 1

    def describe(self) -> dict[str, str]:
        """Field -> a short printable value, to name what differs between ranks."""
        sharding = self.sharding
        documents = None
        if sharding.varlen:
            lengths = sharding.doc_lengths
            documents = f"{len(lengths)} documents, {sum(lengths)} tokens, lengths {list(lengths[:6])}{' ...' if len(lengths) > 6 else ''}"
        return {
            "kind": "varlen" if self.varlen else "dense",
            "q shape": str(self.q_shape),
            "k/v shape": str(self.kv_shape),
            "dtype": str(self.dtype),
            "layout": sharding.layout.name,
            "world size": str(sharding.world_size),
            "documents": str(documents),
            "mask (causal, window_size)": str(self.mask),
            "softmax_scale": repr(self.softmax_scale),
            "softcap": repr(self.softcap),
            "sinks": "None" if self.sinks is None else f"shape {self.sinks}",
            "backend": self.backend,
            "transport": self.transport,
            "ulysses": str(self.ulysses),
            "deterministic": str(self.deterministic),
        }


CACHED_CALLS = 256  # distinct call signatures a process keeps validated (a model meets a few)
_validated: collections.OrderedDict[tuple, tuple[RingCall, AttentionBackend]] = collections.OrderedDict()
_validated_lock = threading.Lock()


def validated_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None,
    world_size: int, *, causal: bool, window: tuple[int, int], softmax_scale: float | None, softcap: float | None, layout: str,
    backend: str | AttentionBackend | None, transport: str | None, backward: bool, deterministic: bool, tensors_checked: bool = False,
) -> tuple[RingCall, AttentionBackend]:
    """The RingCall of one ring call and its backend; raises ValueError naming a bad argument.

    The scalar options (`causal`, `window`, `softmax_scale`, None for head_dim**-0.5, `softcap`,
    `deterministic`) come checked and normalized by the entry point (attention.py); the tensors, the documents, the
    layout, the backend and the transport are checked here. Cached by everything the checks
    read, so that a call signature is validated once per process: the backward, and every
    later step of the same shapes, reuse what the first forward decided. `tensors_checked`: q, k
    and v stand for tensors the caller checked itself (the 2-D call's ring, on stand-ins)."""
    transport = transport if transport is not None else os.environ.get("FA4_CP_TRANSPORT", "auto")
    key = (
        _tensor_key(q), _tensor_key(k), _tensor_key(v), _documents_key(cu_seqlens), None if sinks is None else _tensor_key(sinks),
        world_size, causal, tuple(window), softmax_scale, softcap, layout, _backend_key(backend), transport, backward, deterministic,
        tensors_checked,
    )
    with _validated_lock:  # the ranks of a simulated ring are threads: one validates, the others reuse
        hit = _validated.get(key)
        if hit is None:
            hit = _validated[key] = _validate(
                q, k, v, cu_seqlens, sinks, world_size, causal, window, softmax_scale, softcap, layout, backend, transport, backward,
                deterministic, tensors_checked,
            )
            if len(_validated) > CACHED_CALLS:
                _validated.popitem(last=False)
        else:
            _validated.move_to_end(key)
    return hit


def _backend_key(backend: object) -> object:
    """A name as is; an object by identity (the cached entry holds it, so the id stays its)."""
    return backend if backend is None or isinstance(backend, str) else ("object", id(backend))


def _tensor_key(t: object) -> tuple:
    if not isinstance(t, torch.Tensor):
        return (type(t).__name__,)
    return tuple(t.shape), t.dtype, t.device


def _documents_key(cu_seqlens: object) -> tuple | None:
    """cu_seqlens by value (a reused address can hold other documents); a device tensor's values
    cost a sync, as their check does."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
        return _tensor_key(cu_seqlens)
    return tuple(cu_seqlens.tolist())


def _validate(
    q, k, v, cu_seqlens, sinks, world_size, causal, window, softmax_scale, softcap, layout, backend, transport, backward, deterministic,
    tensors_checked,
) -> tuple[RingCall, AttentionBackend]:
    if not tensors_checked:
        check_qkv(q, k, v, varlen=cu_seqlens is not None)
    if cu_seqlens is None:
        layout_ = get_layout(layout)
        layout_.check_length(q.shape[1] * world_size, world_size, "q", local_len=q.shape[1])
        sharding = Sharding.dense(q.shape[1] * world_size, world_size, layout_)
    else:
        doc_lengths = check_cu_seqlens(cu_seqlens)
        sharding = Sharding.documents(doc_lengths, world_size, layout)
        if q.shape[0] != sharding.local_len:
            raise ValueError(
                f"cu_seqlens: its documents ({sum(doc_lengths)} tokens) take {sharding.local_len} local rows per rank "
                f"under the {layout} layout over {world_size} ranks, but q has {q.shape[0]}"
            )
    kernels = get_backend(backend, q, backward=backward)
    call = RingCall(
        varlen=sharding.varlen,
        q_shape=tuple(q.shape),
        kv_shape=tuple(k.shape),
        dtype=q.dtype,
        sharding=sharding,
        mask=BandMask.from_flags(causal, window),
        softmax_scale=q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale,
        softcap=softcap,
        sinks=check_sinks(sinks, q),
        backend=kernels.name,
        transport=check_transport(transport),
        deterministic=deterministic,
    )
    return call, kernels
