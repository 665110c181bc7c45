"""The Ulysses all-to-all: sequence shards to head shards over the ulysses ranks, and back,
pipelined with the ring by head chunks.

Rank i of u holds rows piece i of its ring rank's rows, all heads. Before the ring, every rank
sends head group j of its piece to rank j and stacks the pieces it receives in rank order: it then
holds all of the ring rank's rows for head group i. After the ring, the reverse exchange brings
each rank its own rows of every head group. The backward of one exchange is the other. The
exchanges (runtime/exchange.py) go through the call's transport where it copies into peers
(comm/all_to_all.py: the copy engine's take no SM), else through the group's all_to_all_single.

A rank's head group is cut into `ulysses_chunks` chunks (plan/head_chunks.py): chunk j + 1's
inbound exchange is posted before chunk j's ring runs, and chunk j's outbound exchange right after
it, so that on a stream-ordered transport only the first chunk's inbound and the last chunk's
outbound exchanges are exposed. One chunk is the plain 2-D call. KV heads fewer than u are
repeated to u (one per rank), never to h; a KV head that several chunks read travels with the
first, and its dK/dV is summed over them unrounded (each chunk's kernels adding to the sums the
one before left) and finished once, by its last chunk's ring, before it travels back.

`ulysses_forward` and `ulysses_backward` are the stage a 2-D call runs around its ring: r steps
of u-times larger blocks replace W steps, with every mask, layout and document feature of the
ring. The forward returns, besides out and lse, the head-sharded tensors its backward reads, chunk
first ((chunks, ..., padded rows, heads, d)), padded to u x the local rows so that their shapes
follow from q's (the ring's own rows depend on the documents' lengths).
"""

from __future__ import annotations

import torch

from ..call import PreparedCall
from ..comm.group import RingGroup
from ..comm.mesh import UlyssesRing
from ..kernels.interface import accumulator_dtype, returned_lse_dtype
from ..plan.head_chunks import HeadChunks
from .exchange import Exchange, Parts, Rows, heads_place, rows_place
from .ring_run import ring_run_backward, ring_run_backward_sums, ring_run_forward


def kv_heads_for(kv_heads: int, ulysses: int) -> torch.Tensor | None:
    """Which KV heads travel to each ulysses rank when there are fewer than ranks: rank i's q
    heads all read KV head i * h_kv / u, so each KV head is repeated u / h_kv times, never to h.
    None when every rank takes h_kv / u heads of its own."""
    if kv_heads >= ulysses:
        return None
    return torch.tensor([i * kv_heads // ulysses for i in range(ulysses)])


def ulysses_forward(
    prepared: PreparedCall, mesh: UlyssesRing, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """out (q's shape with v's head_dim) and lse of this rank's rows; then the head-sharded q, k,
    v, out and lse of its ring rank's rows, chunk first, padded to u x the local rows, for the
    backward."""
    u, rows, padded = mesh.ulysses.world_size, prepared.mesh.ring_rows, prepared.mesh.padded_ring_rows
    chunks: HeadChunks = prepared.head_chunks
    if (repeat := kv_heads_for(k.shape[-2], u)) is not None:
        k, v = (t.index_select(-2, repeat.to(t.device)) for t in (k, v))
    exchange = Exchange(mesh.ulysses, prepared.ring.transport, q.device)
    q_pieces = _by_rank_and_chunk(q, u, chunks.count)  # (u, chunks, *batch, local rows, heads, d)
    k_pieces, v_pieces = (_by_rank_and_chunk(t, u, chunks.kv_count) for t in (k, v))

    def inbound(chunk: int) -> list[torch.Tensor]:
        kv = chunks.kv_of(chunk)
        return [q_pieces[:, chunk], *((k_pieces[:, kv], v_pieces[:, kv]) if chunks.brings_kv(chunk) else ())]

    batch, local = q.shape[:-3], q.shape[-3]

    def heads(pieces: torch.Tensor) -> torch.Tensor:  # (chunks, *batch, padded rows, heads, d) for (u, chunks, ...) pieces
        return pieces.new_empty((pieces.shape[1], *batch, padded, *pieces.shape[-2:]))

    heads_q, heads_k, heads_v = heads(q_pieces), heads(k_pieces), heads(v_pieces)

    def inbound_places(chunk: int) -> list[torch.Tensor]:  # what arrives, stacked by rows into what the backward keeps
        kv = chunks.kv_of(chunk)
        return [rows_place(t, u, -3) for t in (heads_q[chunk], *((heads_k[kv], heads_v[kv]) if chunks.brings_kv(chunk) else ()))]

    # one chunk's out is saved as it comes (a view); several chunks' rings write theirs in place
    heads_out = q.new_empty((chunks.count, *batch, padded, chunks.q_heads, v.shape[-1])) if chunks.count > 1 else None
    # made before any exchange: each chunk's returning pieces are placed into their heads as they come
    out = q.new_empty((*batch, local, q.shape[-2], v.shape[-1]))
    lse = q.new_empty((*batch, q.shape[-2], local), dtype=returned_lse_dtype(q.dtype))
    returning_parts = Parts([((*batch, local, chunks.q_heads, v.shape[-1]), q.dtype), ((*batch, chunks.q_heads, local), returned_lse_dtype(q.dtype))])
    arriving_parts = Parts.of(inbound(0), u)  # the largest: the first chunk brings KV
    regions = exchange.regions([arriving_parts] * min(2, chunks.count) + [returning_parts] * chunks.count)
    pending = exchange.post(arriving_parts, inbound(0), regions[0], inbound_places(0))
    lses, returning = [], []
    for chunk in range(chunks.count):
        pending.wait()
        if chunk + 1 < chunks.count:  # its exchange runs behind this chunk's ring
            pending = exchange.post(Parts.of(inbound(chunk + 1), u), inbound(chunk + 1), regions[(chunk + 1) % 2], inbound_places(chunk + 1))
        kv = chunks.kv_of(chunk)
        chunk_out, chunk_lse = ring_run_forward(
            prepared.ring, prepared.kernels, mesh.ring, *(t[..., :rows, :, :] for t in (heads_q[chunk], heads_k[kv], heads_v[kv])),
            _chunk_sinks(sinks, mesh.ulysses, chunks, chunk), padded, None if heads_out is None else heads_out[chunk],
        )
        chunk_lse = _pad_rows(chunk_lse, padded, -1, float("-inf"))  # padding rows: out 0, lse -inf
        heads_out = chunk_out.unsqueeze(0) if heads_out is None else heads_out
        lses.append(chunk_lse)
        places = [heads_place(t, u, chunks.count, chunk, -2) for t in (out, lse)]
        returning.append(exchange.post(returning_parts, [Rows(chunk_out, -3), Rows(chunk_lse, -1)], regions[min(2, chunks.count) + chunk], places))
    for pending in returning:
        pending.wait()
    return out, lse, heads_q, heads_k, heads_v, heads_out, _chunk_first(lses)


def ulysses_backward(
    prepared: PreparedCall, mesh: UlyssesRing, heads_q: torch.Tensor, heads_k: torch.Tensor, heads_v: torch.Tensor,
    heads_out: torch.Tensor, heads_lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, sinks: torch.Tensor | None,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's rows and the sinks' gradient (empty without sinks): the
    forward's all-to-alls in reverse around the ring's backward, chunk by chunk."""
    u, rows = mesh.ulysses.world_size, prepared.mesh.ring_rows
    chunks: HeadChunks = prepared.head_chunks
    exchange = Exchange(mesh.ulysses, prepared.ring.transport, dout.device)
    dout_pieces = _by_rank_and_chunk(dout, u, chunks.count)
    dlse_pieces = None if dlse is None else _by_rank_and_chunk(dlse, u, chunks.count)

    def inbound(chunk: int) -> list[torch.Tensor]:
        return [dout_pieces[:, chunk], *(() if dlse_pieces is None else (dlse_pieces[:, chunk],))]

    # A KV head repeated over ranks gets one partial dK/dV from each: they travel unrounded and
    # are added, in head order, before the one rounding (16-bit partials reached ~1.9x the error).
    # A KV chunk that several head chunks read: each chunk's kernels add to the sums the chunk
    # before left unfinished, and its last chunk finishes them once.
    repeated = kv_heads_for(kv_heads, u) is not None
    travel_dtype = accumulator_dtype(heads_k.dtype) if repeated else heads_k.dtype
    dkv_dtype = travel_dtype if repeated else None
    batch, local = dout.shape[:-3], dout.shape[-3]

    def returning_parts(chunk: int) -> Parts:
        shapes = [((*batch, local, chunks.q_heads, heads_q.shape[-1]), heads_q.dtype)]
        if chunks.finishes_kv(chunk):
            shapes += [((*batch, local, chunks.kv_heads, t.shape[-1]), travel_dtype) for t in (heads_k, heads_v)]
        return Parts(shapes)

    # made before any exchange: each chunk's returning pieces are placed into their heads as they come;
    # dK/dV with the KV heads as they travelled: kv_heads, or u where repeated (one per rank)
    dq = dout.new_empty((*batch, local, dout.shape[-2], heads_q.shape[-1]), dtype=heads_q.dtype)
    dk, dv = (dout.new_empty((*batch, local, max(kv_heads, u), t.shape[-1]), dtype=travel_dtype) for t in (heads_k, heads_v))

    def returning_places(chunk: int) -> list[torch.Tensor]:
        places = [heads_place(dq, u, chunks.count, chunk, -2)]
        if chunks.finishes_kv(chunk):
            places += [heads_place(t, u, chunks.kv_count, chunks.kv_of(chunk), -2) for t in (dk, dv)]
        return places

    # dout is read where it lands when its pieces stack in row order there (no batch dim wider
    # than one), else placed by rows as it comes, as the lse's gradient always is
    read_in_place = all(n == 1 for n in batch)
    padded = prepared.mesh.padded_ring_rows
    hc = chunks.q_heads
    placed_dout = None if read_in_place else dout.new_empty((chunks.count, *batch, padded, hc, dout.shape[-1]))
    placed_dlse = None if dlse is None else dlse.new_empty((chunks.count, *batch, hc, padded))

    def inbound_places(chunk: int) -> list[torch.Tensor | None]:
        return [
            None if placed_dout is None else rows_place(placed_dout[chunk], u, -3),
            *(() if placed_dlse is None else (rows_place(placed_dlse[chunk], u, -1),)),
        ]

    arriving_parts = Parts.of(inbound(0), u)
    regions = exchange.regions([arriving_parts] * min(2, chunks.count) + [returning_parts(c) for c in range(chunks.count)])
    pending = exchange.post(arriving_parts, inbound(0), regions[0], inbound_places(0))
    returning, dsinks_parts, sums = [], [], None
    for chunk in range(chunks.count):
        arrived = pending.wait()
        if chunk + 1 < chunks.count:  # its exchange runs behind this chunk's ring
            pending = exchange.post(arriving_parts, inbound(chunk + 1), regions[(chunk + 1) % 2], inbound_places(chunk + 1))
        # read by this chunk's ring alone, before the exchange two chunks on lands in its region
        heads_dout = exchange.stacked(arrived[0], -3) if placed_dout is None else placed_dout[chunk]
        heads_dlse = None if placed_dlse is None else placed_dlse[chunk][..., :rows].contiguous()
        kv = chunks.kv_of(chunk)
        ring_args = (
            prepared.ring, prepared.kernels, mesh.ring,
            *(t[..., :rows, :, :] for t in (heads_q[chunk], heads_k[kv], heads_v[kv], heads_out[chunk])),
            heads_lse[chunk][..., :rows], heads_dout[..., :rows, :, :], heads_dlse, _chunk_sinks(sinks, mesh.ulysses, chunks, chunk),
        )
        if chunks.finishes_kv(chunk):
            chunk_dq, chunk_dk, chunk_dv, chunk_dsinks = ring_run_backward(*ring_args, dkv_dtype=dkv_dtype, dkv_sums=sums)
            sums, sources = None, [Rows(chunk_dq, -3), Rows(chunk_dk, -3), Rows(chunk_dv, -3)]
        else:
            chunk_dq, sums, chunk_dsinks = ring_run_backward_sums(*ring_args, dkv_sums=sums)
            sources = [Rows(chunk_dq, -3)]
        dsinks_parts.append(chunk_dsinks)
        returning.append(exchange.post(returning_parts(chunk), sources, regions[min(2, chunks.count) + chunk], returning_places(chunk)))
    for pending in returning:
        pending.wait()
    if repeated:
        dk, dv = (t.unflatten(-2, (kv_heads, u // kv_heads)).sum(-2).to(heads_k.dtype) for t in (dk, dv))
    dsinks = dout.new_empty(0)
    if sinks is not None:
        dsinks = torch.zeros_like(sinks)
        dsinks[_own_heads(mesh.ulysses, chunks.count * chunks.q_heads)] = torch.cat(dsinks_parts)
    return dq, dk, dv, dsinks


def _by_rank_and_chunk(x: torch.Tensor, ranks: int, chunks: int) -> torch.Tensor:
    """A view of x (heads at dim -2, ordered rank, chunk, head) as (ranks, chunks, ..., heads / (ranks chunks), ...)."""
    return x.unflatten(-2, (ranks, chunks, -1)).movedim(-4, 0).movedim(-3, 1)


def _chunk_first(chunks: list[torch.Tensor]) -> torch.Tensor:
    """(chunks, ...): a view of the one chunk's tensor, else one copy."""
    return chunks[0].unsqueeze(0) if len(chunks) == 1 else torch.stack(chunks)


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


def _chunk_sinks(sinks: torch.Tensor | None, group: RingGroup, chunks: HeadChunks, chunk: int) -> torch.Tensor | None:
    if sinks is None:
        return None
    first = (group.rank * chunks.count + chunk) * chunks.q_heads
    return sinks[first : first + chunks.q_heads]
