"""Ring attention over a 2-D Ulysses x ring mesh (u x r ranks).

q, k and v arrive sequence-sharded over the mesh (plan/mesh_sharding.py). An all-to-all over the
u ulysses ranks makes them head-sharded: each rank then holds all of its ring rank's rows for h/u
heads, and the ring loop runs over the r ring ranks exactly as a 1-D ring of those rows, with
every mask, layout and document feature. A second all-to-all brings out and lse back; the
backward mirrors both (runtime/ulysses.py). r steps of u-times larger blocks replace W steps.

The whole call is checked before the first all-to-all: the arguments (against stand-ins of the
ring's shapes that hold no memory), the heads' split, and the cross-rank agreement over both mesh
dims; the ring inside then runs that call (ops.run_forward), unchecked. q, k and v are checked
on the real tensors, once per call; the ring's call, on stand-ins, once per signature. KV heads fewer than u are
repeated to u (one per rank), never to h.

`mesh_forward` and `mesh_backward` are the two halves that mesh_ops.py registers as custom ops.
The forward returns, besides out and lse, the head-sharded tensors the backward reads, padded to
u x the local rows so that their shapes follow from q's (the ring's own rows depend on the
documents' lengths).
"""

from __future__ import annotations

import dataclasses

import torch

from .call import validated_call
from .comm.group import RingGroup
from .comm.mesh import UlyssesRing
from .consistency import check_consistency, count_call
from .handles import backend_of, group_by_name
from .ops import run_backward, run_forward
from .plan.layout import get_layout
from .plan.mesh_sharding import MeshSharding, mesh_sharding
from .plan.sharding import Sharding
from .runtime.ulysses import heads_to_sequence, kv_heads_for, lse_heads_to_sequence, lse_sequence_to_heads, sequence_to_heads
from .validation import check_cu_seqlens, check_heads, check_qkv


def _sharding(q: torch.Tensor, cu_seqlens: torch.Tensor | None, mesh: UlyssesRing, layout: str) -> MeshSharding:
    u, r = mesh.ulysses.world_size, mesh.ring.world_size
    if cu_seqlens is None:
        seq_len, layout_ = q.shape[-3] * u * r, get_layout(layout)
        layout_.check_length(seq_len, r, "q")
        sharding = mesh_sharding(Sharding.dense(seq_len, r, layout_), u)
    else:
        sharding = mesh_sharding(Sharding.documents(check_cu_seqlens(cu_seqlens), r, layout), u)
    if q.shape[-3] != sharding.local_len:
        raise ValueError(f"q: the {layout} layout over {u} x {r} ranks gives each rank {sharding.local_len} rows, got {q.shape[-3]}")
    return sharding


def _ring_call(ring_q, ring_k, ring_v, cu_seqlens, ring_sinks, mesh: UlyssesRing, causal, window, softmax_scale, softcap, layout,
               backend, transport, grad: bool, deterministic: bool):
    """The inner ring's validated call (cached: the backward reuses the forward's) and backend."""
    return validated_call(
        ring_q, ring_k, ring_v, cu_seqlens, ring_sinks, mesh.ring.world_size, causal=causal, window=tuple(window),
        softmax_scale=softmax_scale, softcap=softcap, layout=layout, backend=backend_of(backend), transport=transport, backward=grad,
        deterministic=deterministic, tensors_checked=True,
    )


def _stand_in(like: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """A tensor of the ring's shape for the checks, holding no memory."""
    shape = (*like.shape[:-3], rows, heads, like.shape[-1])
    return torch.empty_strided(shape, (0,) * len(shape), dtype=like.dtype, device=like.device)


def _mesh(ulysses: str, ring: str) -> UlyssesRing:
    return UlyssesRing(group_by_name(ulysses), group_by_name(ring))


def _pad_rows(t: torch.Tensor, rows: int, seq_dim: int, value: float = 0.0) -> torch.Tensor:
    """`t` with rows appended along `seq_dim` up to `rows` (the last ulysses piece's padding)."""
    missing = rows - t.shape[seq_dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[seq_dim] = missing
    return torch.cat([t, t.new_full(shape, value)], dim=seq_dim)


def _own_heads(group: RingGroup, head_group: int) -> slice:
    """The heads a ulysses rank runs the ring on."""
    return slice(group.rank * head_group, (group.rank + 1) * head_group)


def _ring_sinks(sinks: torch.Tensor | None, group: RingGroup, head_group: int) -> torch.Tensor | None:
    return None if sinks is None else sinks[_own_heads(group, head_group)]


def mesh_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None,
    ulysses: str, ring: str, causal: bool, window: list[int], softmax_scale: float | None, softcap: float | None, layout: str,
    backend: str | None, transport: str | None, deterministic: bool, grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (q's shape) and lse of this rank's rows; then, for the backward, the head-sharded q,
    k, v, out and lse of its ring rank's rows, padded to u x the local rows."""
    mesh = _mesh(ulysses, ring)
    numbers = [count_call(group) for group in (mesh.ulysses, mesh.ring)]
    u = mesh.ulysses.world_size
    check_qkv(q, k, v, varlen=cu_seqlens is not None)  # the real tensors; the ring's call is made on stand-ins
    heads, kv_heads = q.shape[-2], k.shape[-2]
    check_heads(heads, kv_heads, u)
    sharding = _sharding(q, cu_seqlens, mesh, layout)
    rows, head_group = sharding.ring_rows, heads // u
    ring_sinks = _ring_sinks(sinks, mesh.ulysses, head_group)
    ring_q, ring_k, ring_v = (_stand_in(t, rows, h) for t, h in ((q, head_group), (k, max(kv_heads // u, 1)), (v, max(kv_heads // u, 1))))
    ring_call, kernels = _ring_call(
        ring_q, ring_k, ring_v, cu_seqlens, ring_sinks, mesh, causal, window, softmax_scale, softcap, layout, backend, transport, grad,
        deterministic,
    )
    call = dataclasses.replace(ring_call, ulysses=u, q_shape=tuple(q.shape), kv_shape=tuple(k.shape))
    for group, number in zip((mesh.ulysses, mesh.ring), numbers):  # both dims agree: every rank of the mesh does
        check_consistency(group, call, q.device, number, sinks)

    if (repeat := kv_heads_for(kv_heads, u)) is not None:
        k, v = (t.index_select(-2, repeat.to(t.device)) for t in (k, v))
    heads_q, heads_k, heads_v = (sequence_to_heads(t, mesh.ulysses) for t in (q, k, v))
    out, lse = run_forward(
        ring_call, kernels, mesh.ring, heads_q[..., :rows, :, :], heads_k[..., :rows, :, :], heads_v[..., :rows, :, :], ring_sinks,
    )
    out = _pad_rows(out, sharding.padded_ring_rows, -3)  # padding rows: out 0, lse -inf
    lse = _pad_rows(lse, sharding.padded_ring_rows, -1, float("-inf"))
    return heads_to_sequence(out, mesh.ulysses), lse_heads_to_sequence(lse, mesh.ulysses), heads_q, heads_k, heads_v, out, lse


def mesh_backward(
    heads_q: torch.Tensor, heads_k: torch.Tensor, heads_v: torch.Tensor, heads_out: torch.Tensor, heads_lse: torch.Tensor,
    dout: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None, kv_heads: int,
    ulysses: str, ring: str, causal: bool, window: list[int], softmax_scale: float | None, softcap: float | None, layout: str,
    backend: str | None, transport: str | None, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's rows and the sinks' gradient (empty without sinks): the
    all-to-alls of the forward in reverse around the ring's backward."""
    mesh = _mesh(ulysses, ring)
    u = mesh.ulysses.world_size
    sharding = _sharding(dout, cu_seqlens, mesh, layout)
    rows, head_group = sharding.ring_rows, heads_q.shape[-2]
    ring_sinks = _ring_sinks(sinks, mesh.ulysses, head_group)
    heads_dout = sequence_to_heads(dout.contiguous(), mesh.ulysses)
    heads_dlse = None if dlse is None else lse_sequence_to_heads(dlse.contiguous(), mesh.ulysses)[..., :rows].contiguous()
    ring_q, ring_k, ring_v = (_stand_in(t, rows, t.shape[-2]) for t in (heads_q, heads_k, heads_v))
    ring_call, kernels = _ring_call(
        ring_q, ring_k, ring_v, cu_seqlens, ring_sinks, mesh, causal, window, softmax_scale, softcap, layout, backend, transport, True,
        deterministic,
    )
    dq, dk, dv, ring_dsinks = run_backward(
        ring_call, kernels, mesh.ring, *(t[..., :rows, :, :] for t in (heads_q, heads_k, heads_v, heads_out)), heads_lse[..., :rows],
        heads_dout[..., :rows, :, :], heads_dlse, ring_sinks,
    )
    dq, dk, dv = (heads_to_sequence(_pad_rows(t.to(heads_q.dtype), sharding.padded_ring_rows, -3), mesh.ulysses) for t in (dq, dk, dv))
    if kv_heads_for(kv_heads, u) is not None:  # the repeated heads' gradients add up, in head order
        dk, dv = (t.unflatten(-2, (kv_heads, u // kv_heads)).sum(-2) for t in (dk, dv))
    dsinks = dout.new_empty(0)
    if sinks is not None:
        dsinks = torch.zeros_like(sinks)
        dsinks[_own_heads(mesh.ulysses, head_group)] = ring_dsinks
    return dq, dk, dv, dsinks
