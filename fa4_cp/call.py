"""RingCall: the validated arguments of one ring attention call; PreparedCall: what a call runs.

A call is checked in full before anything communicates: its RingOptions at the entry point
(options.py), then here the tensors and documents against the options and the group's sizes
(which needs no communication), once per call signature (`prepared_call`, cached: the backward
and every later step of the same shapes reuse what the first forward decided). The frozen
RingCall that comes out holds everything every rank must agree on, so it is also the cross-rank
signature (`digest`) and, with the rank, the key of the rank's cached plan. What may differ
between ranks (the tensors' values) is not in it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .comm.transport import TransportKind
from .handles import backend_of
from .kernels import AttentionBackend, BandMask, get_backend
from .options import RingOptions
from .plan.dense_sharding import DenseSharding
from .plan.head_chunks import HeadChunks
from .plan.layout import get_layout
from .plan.mesh_sharding import MeshSharding, mesh_sharding
from .plan.sharding import Sharding
from .plan.sharding_rows import ShardingRows
from .tuning.mesh_model import plan_mesh
from .validation import check_cu_seqlens, check_heads, check_qkv, check_sinks

logger = logging.getLogger("fa4_cp")


@dataclass(frozen=True)
class RingCall:
    varlen: bool
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    v_head_dim: int
    """v's head_dim, which may differ from k's (MLA)."""
    dtype: torch.dtype
    sharding: ShardingRows
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
    ulysses_chunks: int = 1
    """Head chunks of a 2-D call (plan/head_chunks.py)."""

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
            "v head_dim": str(self.v_head_dim),
            "dtype": str(self.dtype),
            "layout": sharding.layout_name,
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
            "ulysses_chunks": str(self.ulysses_chunks),
        }


@dataclass(frozen=True)
class PreparedCall:
    """A validated call as it runs: the same object for the forward and its backward."""

    call: RingCall
    """The whole call: what every rank (of both dims of a 2-D mesh) must agree on."""
    ring: RingCall
    """The ring loop's own call: `call` itself on a 1-D group; on a 2-D mesh, the ring over the
    head-sharded rows of this rank's ring rank."""
    kernels: AttentionBackend
    mesh: MeshSharding | None
    """The tokens' split over a 2-D mesh; None on a 1-D group."""
    head_chunks: HeadChunks | None = None
    """How each ulysses rank's heads are cut for the all-to-all's pipeline; None on a 1-D group."""


CACHED_CALLS = 256  # distinct call signatures a process keeps validated (a model meets a few)
_prepared: collections.OrderedDict[tuple, PreparedCall] = collections.OrderedDict()
_prepared_lock = threading.Lock()


def prepared_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None,
    options: RingOptions, *, ring_size: int, ulysses_size: int = 1, backward: bool,
) -> PreparedCall:
    """The PreparedCall of one call over `ulysses_size` x `ring_size` ranks; raises ValueError
    naming a bad argument. Cached by everything the checks read (the tensors' shapes, dtype and
    device, the documents by value), so that a signature is validated once per process; the
    ranks of a simulated ring are threads, and one validates for all."""
    key = _call_key(_tensor_key(q), _tensor_key(k), _tensor_key(v), cu_seqlens, sinks, options, ring_size, ulysses_size, backward)
    return _cached(key, lambda: _prepare(q, k, v, cu_seqlens, sinks, options, ring_size, ulysses_size, backward))


def backward_prepared_call(
    dout: torch.Tensor, q_head_dim: int, kv_heads: int, k_head_dim: int, v_head_dim: int, cu_seqlens: torch.Tensor | None,
    sinks: torch.Tensor | None, options: RingOptions, *, ring_size: int, ulysses_size: int = 1,
) -> PreparedCall:
    """The forward's PreparedCall, found from its backward's dout (q's rows and heads, v's
    head_dim) and the forward's head sizes: keyed without making the stand-in tensors that only
    a call the cache has dropped needs."""
    lead, heads = dout.shape[:-2], dout.shape[-2]
    shapes = ((*lead, heads, q_head_dim), (*lead, kv_heads, k_head_dim), (*lead, kv_heads, v_head_dim))
    key = _call_key(*((shape, dout.dtype, dout.device) for shape in shapes), cu_seqlens, sinks, options, ring_size, ulysses_size, True)

    def prepare() -> PreparedCall:
        q, k, v = (stand_in(dout, shape) for shape in shapes)
        return _prepare(q, k, v, cu_seqlens, sinks, options, ring_size, ulysses_size, True)

    return _cached(key, prepare)


def _call_key(q_key, k_key, v_key, cu_seqlens, sinks, options: RingOptions, ring_size: int, ulysses_size: int, backward: bool) -> tuple:
    """Everything the checks read: the tensors' shapes, dtype and device, the documents by value."""
    return (
        q_key, k_key, v_key, _documents_key(cu_seqlens), None if sinks is None else _tensor_key(sinks), options, ring_size, ulysses_size,
        backward,
    )


def _cached(key: tuple, prepare: Callable[[], PreparedCall]) -> PreparedCall:
    with _prepared_lock:
        hit = _prepared.get(key)
        if hit is None:
            hit = _prepared[key] = prepare()
            if len(_prepared) > CACHED_CALLS:
                _prepared.popitem(last=False)
        else:
            _prepared.move_to_end(key)
    return hit


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


def _prepare(q, k, v, cu_seqlens, sinks, options: RingOptions, ring_size: int, ulysses_size: int, backward: bool) -> PreparedCall:
    check_qkv(q, k, v, varlen=cu_seqlens is not None)
    if ulysses_size == 1:
        if options.ulysses_chunks != 1:
            raise ValueError(
                f"ulysses_chunks: {options.ulysses_chunks} head chunks need ulysses ranks to exchange with (a 2-D mesh whose "
                "'ulysses' dim has more than one rank); expected 1"
            )
        ring, kernels = _ring_call(q, k, v, check_sinks(sinks, q), options, _sharding(q, cu_seqlens, options, ring_size), backward)
        if ring.varlen and options.causal:
            _suggest_a_2d_split(ring.sharding.doc_lengths, ring_size, q.shape[-2], k.shape[-2], q.shape[-1])
        return PreparedCall(ring, ring, kernels, None)
    heads, kv_heads = q.shape[-2], k.shape[-2]
    check_heads(heads, kv_heads, ulysses_size)
    sinks_shape = check_sinks(sinks, q)
    mesh = _mesh_sharding(q, cu_seqlens, options, ring_size, ulysses_size)
    head_group, kv_group = heads // ulysses_size, max(kv_heads // ulysses_size, 1)
    chunks = HeadChunks.of(head_group, kv_group, options.ulysses_chunks)
    ring_q, ring_k, ring_v = (  # one head chunk's ring
        stand_in(t, (*t.shape[:-3], mesh.ring_rows, h, t.shape[-1])) for t, h in ((q, chunks.q_heads), (k, chunks.kv_heads), (v, chunks.kv_heads))
    )
    ring_sinks = None if sinks is None else (chunks.q_heads,)  # each chunk's heads' sinks
    ring, kernels = _ring_call(ring_q, ring_k, ring_v, ring_sinks, options, mesh.ring, backward)
    call = dataclasses.replace(
        ring, ulysses=ulysses_size, ulysses_chunks=chunks.count, q_shape=tuple(q.shape), kv_shape=tuple(k.shape), sinks=sinks_shape,
    )
    return PreparedCall(call, ring, kernels, mesh, chunks)


def _ring_sharding(
    seq_len: int, cu_seqlens: torch.Tensor | None, options: RingOptions, ring_size: int, local_len: int | None = None, ulysses: int = 1,
) -> ShardingRows:
    """Who holds which tokens of a ring of `ring_size` ranks (of a `ulysses` x `ring_size` mesh): a
    sequence of `seq_len` tokens (the layout's length rule, checked once here) or the documents of
    `cu_seqlens`."""
    if cu_seqlens is None:
        layout = get_layout(options.layout)
        layout.check_length(seq_len, ring_size, "q", local_len=local_len)
        return DenseSharding(layout, ring_size, (seq_len,))
    return Sharding.documents(check_cu_seqlens(cu_seqlens), ring_size, options.layout, ulysses)


def _sharding(q: torch.Tensor, cu_seqlens: torch.Tensor | None, options: RingOptions, ring_size: int) -> ShardingRows:
    """Who holds which tokens of a 1-D ring; the rows of q must be this rank's."""
    local_len = q.shape[-3]
    sharding = _ring_sharding(local_len * ring_size, cu_seqlens, options, ring_size, local_len)
    if local_len != sharding.local_len:
        raise ValueError(
            f"cu_seqlens: its documents ({sharding.total_len} tokens) take {sharding.local_len} local rows per rank "
            f"under the {options.layout} layout over {ring_size} ranks, but q has {local_len}"
        )
    return sharding


def _mesh_sharding(q: torch.Tensor, cu_seqlens: torch.Tensor | None, options: RingOptions, r: int, u: int) -> MeshSharding:
    """Who holds which tokens of a u x r mesh; the rows of q must be this rank's."""
    sharding = mesh_sharding(_ring_sharding(q.shape[-3] * u * r, cu_seqlens, options, r, ulysses=u), u)
    if q.shape[-3] != sharding.local_len:
        raise ValueError(f"q: the {options.layout} layout over {u} x {r} ranks gives each rank {sharding.local_len} rows, got {q.shape[-3]}")
    return sharding


def stand_in(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of `shape` with `like`'s dtype and device, holding no memory: what a call is
    validated and cached on where its real tensors are not at hand."""
    return torch.empty_strided(shape, (0,) * len(shape), dtype=like.dtype, device=like.device)


def _ring_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: tuple[int, ...] | None, options: RingOptions, sharding: ShardingRows,
    backward: bool,
) -> tuple[RingCall, AttentionBackend]:
    kernels = get_backend(backend_of(options.backend), q, backward=backward, v_head_dim=v.shape[-1])
    call = RingCall(
        varlen=sharding.varlen,
        q_shape=tuple(q.shape),
        kv_shape=tuple(k.shape),
        v_head_dim=v.shape[-1],
        dtype=q.dtype,
        sharding=sharding,
        mask=options.mask,
        softmax_scale=q.shape[-1] ** -0.5 if options.softmax_scale is None else options.softmax_scale,
        softcap=options.softcap,
        sinks=sinks,
        backend=kernels.name,
        transport=options.transport,
        deterministic=options.deterministic,
    )
    return call, kernels


_suggested = False


def _suggest_a_2d_split(doc_lengths: tuple[int, ...], ring_size: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """Once per process: what a 2-D split of a 1-D ring's ranks would predict for its packed
    documents, and how to ask for it (a warning from 1.2x up)."""
    global _suggested
    if _suggested or ring_size < 4:
        return
    _suggested = True
    plan = plan_mesh(ring_size, heads, kv_heads, sum(doc_lengths), head_dim=head_dim, documents=list(doc_lengths))
    ring = next(c for c in plan.candidates if c["ulysses"] == 1)
    if plan.ulysses == 1:
        return
    speedup = ring["ms"] / plan.predicted_ms
    (logger.warning if speedup >= 1.2 else logger.info)(
        "packed documents on a ring of %d ranks: a %d x %d Ulysses x ring split is predicted %.2fx faster for these "
        "documents (fa4_cp.plan_mesh, a model: %s). Ask for it with group= a 2-D DeviceMesh with dims ('ring', 'ulysses'), "
        "or --ulysses auto in launch/train.py.", ring_size, plan.ulysses, plan.ring, speedup, plan.reason,
    )
