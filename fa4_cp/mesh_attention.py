"""Ring attention over a 2-D Ulysses x ring mesh (u x r ranks).

q, k and v arrive sequence-sharded over the mesh (plan/mesh_sharding.py). An all-to-all over the
u ulysses ranks makes them head-sharded: each rank then holds all of its ring rank's rows for h/u
heads, and the ring loop runs over the r ring ranks exactly as a 1-D ring of those rows, with
every mask, layout and document feature. A second all-to-all brings out and lse back; the
backward mirrors both (parallel/ulysses.py). r steps of u-times larger blocks replace W steps.

The whole call is checked before the first all-to-all: the arguments (against stand-ins of the
ring's shapes that hold no memory), the heads' split, and the cross-rank agreement over both mesh
dims. KV heads fewer than u are repeated to u (one per rank), never to h.
"""

from __future__ import annotations

import dataclasses

import torch

from .call import dense_call, varlen_call
from .comm.group import group_name
from .comm.mesh import UlyssesRing
from .consistency import check_consistency
from .ops import backend_key, ring_attention_op
from .parallel.ulysses import heads_to_sequence, kv_heads_for, lse_heads_to_sequence, sequence_to_heads
from .plan.mesh_sharding import MeshSharding, mesh_sharding
from .plan.sharding import Sharding
from .validation import check_cu_seqlens


def check_heads(heads: int, kv_heads: int, ulysses: int) -> None:
    if heads % ulysses:
        raise ValueError(f"q: its {heads} heads do not split over {ulysses} ulysses ranks")
    if kv_heads % ulysses and ulysses % kv_heads:
        raise ValueError(f"k: {kv_heads} KV heads over {ulysses} ulysses ranks: expected a multiple or a divisor of {ulysses}")


def _sharding(q: torch.Tensor, cu_seqlens: torch.Tensor | None, mesh: UlyssesRing, layout: str) -> MeshSharding:
    u, r = mesh.ulysses.world_size, mesh.ring.world_size
    if cu_seqlens is None:
        seq_len = q.shape[-3] * u * r
        if seq_len % (2 * r if layout == "zigzag" else r):
            raise ValueError(f"q: the {layout} layout over {r} ring ranks cannot cut {seq_len} tokens ({q.shape[-3]} per rank)")
        sharding = mesh_sharding(Sharding.dense(seq_len, r, layout), u)
    else:
        sharding = mesh_sharding(Sharding.documents(check_cu_seqlens(cu_seqlens), r, layout), u)
    if q.shape[-3] != sharding.local_len:
        raise ValueError(f"q: the {layout} layout over {u} x {r} ranks gives each rank {sharding.local_len} rows, got {q.shape[-3]}")
    return sharding


def _stand_in(like: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """A tensor of the ring's shape for the checks, holding no memory."""
    shape = (*like.shape[:-3], rows, heads, like.shape[-1])
    return torch.empty_strided(shape, (0,) * len(shape), dtype=like.dtype, device=like.device)


def mesh_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, sinks: torch.Tensor | None,
    mesh: UlyssesRing, *, causal: bool, window: tuple[int, int], softmax_scale: float, softcap: float | None, layout: str,
    backend, transport: str | None, grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's shape) and lse (fp64) of this rank's rows."""
    u, ulysses_rank = mesh.ulysses.world_size, mesh.ulysses.rank
    heads, kv_heads = q.shape[-2], k.shape[-2]
    check_heads(heads, kv_heads, u)
    sharding = _sharding(q, cu_seqlens, mesh, layout)
    rows, head_group = sharding.ring_rows, heads // u
    ring_sinks = None if sinks is None else sinks[ulysses_rank * head_group : (ulysses_rank + 1) * head_group]
    ring_q, ring_kv = _stand_in(q, rows, head_group), _stand_in(k, rows, max(kv_heads // u, 1))
    options = dict(
        causal=causal, window_size=window, softmax_scale=softmax_scale, softcap=softcap, sinks=ring_sinks, layout=layout,
        return_lse=True, backend=backend, transport=transport, backward=grad,
    )
    if cu_seqlens is None:
        call, _ = dense_call(ring_q, ring_kv, ring_kv, mesh.ring.world_size, **options)
    else:
        call, _ = varlen_call(ring_q, ring_kv, ring_kv, cu_seqlens, mesh.ring.world_size, **options)
    call = dataclasses.replace(call, ulysses=u, q_shape=tuple(q.shape), kv_shape=tuple(k.shape))
    for group in (mesh.ulysses, mesh.ring):  # both dims agree: every rank of the mesh does
        check_consistency(group, call, q.device)

    if (repeat := kv_heads_for(kv_heads, u)) is not None:
        k, v = (t.index_select(-2, repeat.to(t.device)) for t in (k, v))
    q, k, v = (sequence_to_heads(t, mesh.ulysses)[..., :rows, :, :] for t in (q, k, v))
    out, lse = ring_attention_op(
        q, k, v, cu_seqlens, ring_sinks, group_name(mesh.ring), causal, list(window), softmax_scale, softcap, layout,
        backend_key(backend), transport, grad,
    )
    padding = sharding.padded_ring_rows - rows
    if padding:  # the last ulysses piece's padding rows: out 0, lse -inf
        out = torch.cat([out, out.new_zeros((padding, *out.shape[1:]))], dim=-3)
        lse = torch.cat([lse, lse.new_full((*lse.shape[:-1], padding), float("-inf"))], dim=-1)
    return heads_to_sequence(out, mesh.ulysses), lse_heads_to_sequence(lse, mesh.ulysses)
