"""RingCall: the validated arguments of one ring attention call.

A call is checked in full before anything communicates: the tensors, mask, scale, layout,
documents, backend and transport, against the group's world size (which needs no
communication). The frozen RingCall that comes out holds everything every rank must agree on,
so it is also the cross-rank signature (`digest`) and, with the rank, the key of the rank's
cached plan. What may differ between ranks (the tensors' values) is not in it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import torch

from .comm.transport import TransportKind
from .kernels import AttentionBackend, BandMask, get_backend
from .plan.layout import get_layout
from .plan.sharding import Sharding
from .validation import (
    check_cu_seqlens,
    check_flag,
    check_local_seq_len,
    check_mask,
    check_qkv,
    check_sinks,
    check_softcap,
    check_softmax_scale,
    check_transport,
)


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


def dense_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world_size: int, *, causal: bool, window_size: tuple[int, int],
    softmax_scale: float | None, softcap: float | None, sinks: torch.Tensor | None, layout: str, return_lse: bool,
    backend: str | AttentionBackend | None, transport: str | None, backward: bool, deterministic: bool = False,
) -> tuple[RingCall, AttentionBackend]:
    """The RingCall of `ring_attention`, and its backend; raises ValueError naming a bad argument."""
    check_qkv(q, k, v, varlen=False)
    layout_ = get_layout(layout)
    check_local_seq_len(q.shape[1], layout_, world_size)
    sharding = Sharding.dense(q.shape[1] * world_size, world_size, layout_)
    return _call(q, k, sharding, causal, window_size, softmax_scale, softcap, sinks, return_lse, backend, transport, backward, deterministic)


def varlen_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, world_size: int, *, causal: bool,
    window_size: tuple[int, int], softmax_scale: float | None, softcap: float | None, sinks: torch.Tensor | None,
    layout: str, return_lse: bool, backend: str | AttentionBackend | None, transport: str | None, backward: bool,
    deterministic: bool = False,
) -> tuple[RingCall, AttentionBackend]:
    """The RingCall of `ring_attention_varlen`, and its backend; raises ValueError naming a bad argument."""
    check_qkv(q, k, v, varlen=True)
    doc_lengths = check_cu_seqlens(cu_seqlens)
    sharding = Sharding.documents(doc_lengths, world_size, layout)
    if q.shape[0] != sharding.local_len:
        raise ValueError(
            f"cu_seqlens: its documents ({sum(doc_lengths)} tokens) take {sharding.local_len} local rows per rank "
            f"under the {layout} layout over {world_size} ranks, but q has {q.shape[0]}"
        )
    return _call(q, k, sharding, causal, window_size, softmax_scale, softcap, sinks, return_lse, backend, transport, backward, deterministic)


def _call(
    q, k, sharding, causal, window_size, softmax_scale, softcap, sinks, return_lse, backend, transport, backward, deterministic,
) -> tuple[RingCall, AttentionBackend]:
    window = check_mask(causal, window_size)
    check_flag("return_lse", return_lse)
    check_flag("deterministic", deterministic)
    kind = check_transport(transport if transport is not None else os.environ.get("FA4_CP_TRANSPORT", "auto"))
    kernels = get_backend(backend, q, backward=backward)
    call = RingCall(
        varlen=sharding.varlen,
        q_shape=tuple(q.shape),
        kv_shape=tuple(k.shape),
        dtype=q.dtype,
        sharding=sharding,
        mask=BandMask.from_flags(causal, window),
        softmax_scale=check_softmax_scale(softmax_scale, q.shape[-1]),
        softcap=check_softcap(softcap),
        sinks=check_sinks(sinks, q),
        backend=kernels.name,
        transport=kind,
        deterministic=deterministic,
    )
    return call, kernels
