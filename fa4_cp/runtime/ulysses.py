"""The Ulysses all-to-all: sequence shards to head shards over the ulysses ranks, and back,
pipelined with the ring by head chunks.

Rank i of u holds rows piece i of its ring rank's rows, all heads. Before the ring, every rank
sends head group j of its piece to rank j and stacks the pieces it receives in rank order: it then
holds all of the ring rank's rows for head group i. After the ring, the reverse exchange brings
each rank its own rows of every head group. The backward of one exchange is the other. The
exchanges go through the call's transport where it copies into peers (comm/all_to_all.py: the
copy engine's take no SM), else through the group's all_to_all_single.

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

import math
from dataclasses import dataclass

import torch

from ..call import PreparedCall
from ..comm.all_to_all import PendingAllToAll, post_all_to_all, post_all_to_all_parts, receive_regions
from ..comm.buffers import aligned
from ..comm.group import RingGroup
from ..comm.mesh import UlyssesRing
from ..comm.pitched import pitched_rows
from ..comm.transport import TransportKind
from ..kernels.interface import accumulator_dtype, returned_lse_dtype
from ..plan.head_chunks import HeadChunks
from .ring_run import ring_run_backward, ring_run_backward_sums, ring_run_forward

PIECE_ALIGNMENT = 16  # bytes between the typed parts of one piece


@dataclass(frozen=True)
class Rows:
    """x's rows along `dim`, cut into one piece per rank, the last ones zero-padded."""

    x: torch.Tensor
    dim: int


class Parts:
    """What one exchange carries to each rank: typed parts side by side in one row of bytes."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], torch.dtype]]):
        self.shapes, self.offsets, end = shapes, [], 0
        for shape, dtype in shapes:
            self.offsets.append(end)
            end += aligned(math.prod(shape) * dtype.itemsize, PIECE_ALIGNMENT)
        self.nbytes = end

    @classmethod
    def of(cls, sources: list[torch.Tensor | Rows], ranks: int) -> Parts:
        shapes = []
        for source in sources:
            if isinstance(source, Rows):
                shape = list(source.x.shape)
                shape[source.dim] = -(-shape[source.dim] // ranks)
                shapes.append((tuple(shape), source.x.dtype))
            else:
                shapes.append((tuple(source.shape[1:]), source.dtype))
        return cls(shapes)

    def piece_bytes(self, part: int) -> int:
        shape, dtype = self.shapes[part]
        return math.prod(shape) * dtype.itemsize

    def views(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each part of `rows` (u, nbytes) as a (u, *its shape) tensor of its dtype."""
        return [
            rows[:, start : start + self.piece_bytes(part)].view(dtype).unflatten(1, shape)
            for part, (start, (shape, dtype)) in enumerate(zip(self.offsets, self.shapes))
        ]

    def part_regions(self, region: torch.Tensor) -> list[torch.Tensor]:
        """A receive region (u, at least nbytes; contiguous) laid out part by part: part p's u
        pieces back to back, as (u, its piece bytes), from u x its offset."""
        flat, ranks = region.view(-1), region.shape[0]
        return [
            flat[ranks * start : ranks * (start + self.piece_bytes(part))].view(ranks, -1) for part, start in enumerate(self.offsets)
        ]

    def typed(self, regions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each part's region (u, piece bytes) as a (u, *its shape) tensor of its dtype."""
        return [region.view(dtype).unflatten(1, shape) for region, (shape, dtype) in zip(regions, self.shapes)]


class PendingExchange:
    def __init__(self, pending: PendingAllToAll, parts: Parts, by_part: bool, places: list[torch.Tensor | None]):
        self._pending, self._parts, self._by_part, self._places = pending, parts, by_part, places

    def wait(self) -> list[torch.Tensor]:
        """Each part as (u, *its shape): row j from rank j (part by part, one tensor each, where
        the transport copies into its peers). A part with a place is there by now (and its row
        here is not to be read)."""
        received = self._pending.wait()
        if self._by_part:  # placed as each peer's pieces arrived
            return self._parts.typed(received)
        arrived = self._parts.views(received)
        for part, place in zip(arrived, self._places):
            if place is not None:
                place.copy_(part)
        return arrived


class Exchange:
    """The all-to-alls of one call over the ulysses group: through the ring call's transport kind
    when it copies into its peers (the copy engine, no SM), else the group's collective."""

    def __init__(self, group: RingGroup, transport: TransportKind, device: torch.device):
        self.group, self.ranks, self.device = group, group.world_size, device
        self.transport = group.transport(transport, device) if group.world_size > 1 else None

    def regions(self, parts: list[Parts]) -> list[torch.Tensor | None]:
        """A receive region for each exchange of `parts`, all in flight at once if need be."""
        return receive_regions(self.group, self.transport, [p.nbytes for p in parts], self.device)

    def post(
        self, parts: Parts, sources: list[torch.Tensor | Rows], region: torch.Tensor | None, places: list[torch.Tensor | None] | None = None,
    ) -> PendingExchange:
        """Start the exchange of `sources` (a (u, ...) tensor: row j to rank j; Rows: cut by rows);
        what arrives of part p goes on into `places[p]` ((u, ...), row j from rank j) where given.
        Through the group's collective, every part is laid out into one send buffer, and placed
        once the whole exchange is here. Where the transport copies into its peers, each part
        lands in a region of its own, from which each peer's piece is placed as soon as it
        arrives, and its pieces are sent from where they lie: a (u, ...) tensor's rows where each
        is pitched rows (a head group of q, k, v or dout), a Rows source's pieces that lie whole
        and contiguous. Only the others are laid out. On a GPU the copy engine makes the pitched
        copies, the sender's and the receiver's: no SM takes part."""
        places = [None] * len(sources) if places is None else places
        if region is None:
            send = self._send_buffer(parts)
            self.lay_out(parts.views(send), sources)
            return PendingExchange(post_all_to_all(self.group, self.transport, send, "the Ulysses all-to-all"), parts, False, places)
        send = views = None  # made once some part is laid out
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.ranks)]
        for part, source in enumerate(sources):
            direct = _row_pieces(source, self.ranks, parts.piece_bytes(part)) if isinstance(source, Rows) else _pitched_pieces(source)
            if direct is None or None in direct:
                if send is None:
                    send = self._send_buffer(parts)
                    views = parts.views(send)
                view = views[part]
                if direct is None:
                    self.lay_out([view], [source])
                else:
                    self._lay_out_past_end(view, source, [j for j, piece in enumerate(direct) if piece is None])
            start = parts.offsets[part]
            for j in range(self.ranks):
                piece = None if direct is None else direct[j]
                pieces[j].append(send[j, start : start + parts.piece_bytes(part)] if piece is None else piece)
        regions = parts.part_regions(region)
        pending = post_all_to_all_parts(self.transport, pieces, regions, "the Ulysses all-to-all", places)
        return PendingExchange(pending, parts, True, places)

    def _send_buffer(self, parts: Parts) -> torch.Tensor:
        return torch.empty((self.ranks, parts.nbytes), dtype=torch.uint8, device=self.device)

    def _lay_out_past_end(self, view: torch.Tensor, source: Rows, ranks: list[int]) -> None:
        """The pieces of `source` for `ranks` that run past its rows' end, into their rows of
        `view` (u, ...): what there is of each, then zeros."""
        size, rows = view.shape[source.dim], source.x.shape[source.dim]
        for j in ranks:
            first = min(j * size, rows)
            self.lay_out([view[j : j + 1]], [Rows(source.x.narrow(source.dim, first, min(size, rows - first)), source.dim)])

    def lay_out(self, views: list[torch.Tensor], sources: list[torch.Tensor | Rows]) -> None:
        """The copies that lay pieces out for sending (bench/gpu_work.py times them apart)."""
        for view, source in zip(views, sources):
            if isinstance(source, Rows):
                _put_rows(view, source.x, source.dim)
            else:
                view.copy_(source)

    def gather(self, pieces: torch.Tensor, dim: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The pieces (u, ...) that arrived, stacked in rank order along `dim` (negative), in new
        memory (or `into`): the receive region is reused by a later exchange."""
        shape = list(pieces.shape[1:])
        shape[dim] *= pieces.shape[0]
        into = pieces.new_empty(shape) if into is None else into
        into.unflatten(dim, (pieces.shape[0], -1)).copy_(pieces.movedim(0, dim - 1))
        return into

    def stacked(self, pieces: torch.Tensor, dim: int) -> torch.Tensor:
        """The pieces (u, ...) stacked in rank order along `dim` (negative): a view where they lie
        in that order already (a part in a region of its own, or the exchange's only part, with
        no batch dim wider than one before `dim`), else a copy (`gather`). The view is of the
        receive region: read it before a later exchange lands there (on a stream-ordered
        transport a hop waits for the kernels queued before it)."""
        moved = pieces.movedim(0, dim - 1)
        ranks_dim = moved.dim() + dim - 1
        if moved.stride(ranks_dim) == moved.shape[ranks_dim + 1] * moved.stride(ranks_dim + 1):
            return moved.flatten(ranks_dim, ranks_dim + 1)
        return self.gather(pieces, dim)



def heads_place(into: torch.Tensor, ranks: int, chunks: int, chunk: int, dim: int) -> torch.Tensor:
    """Where chunk `chunk`'s pieces from every rank go in `into`, as (u, ...): their heads along
    `dim` (negative; heads ordered rank, chunk, head)."""
    return into.unflatten(dim, (ranks, chunks, -1)).select(dim - 1, chunk).movedim(dim - 1, 0)


def rows_place(into: torch.Tensor, ranks: int, dim: int) -> torch.Tensor:
    """Where the pieces from every rank go in `into`, as (u, ...): stacked in rank order along
    `dim` (negative)."""
    return into.unflatten(dim, (ranks, -1)).movedim(dim - 1, 0)


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

    arriving_parts = Parts.of(inbound(0), u)
    regions = exchange.regions([arriving_parts] * min(2, chunks.count) + [returning_parts(c) for c in range(chunks.count)])
    pending = exchange.post(arriving_parts, inbound(0), regions[0])
    returning, dsinks_parts, sums = [], [], None
    for chunk in range(chunks.count):
        arrived = pending.wait()
        if chunk + 1 < chunks.count:  # its exchange runs behind this chunk's ring
            pending = exchange.post(arriving_parts, inbound(chunk + 1), regions[(chunk + 1) % 2])
        # read by this chunk's ring alone, before the exchange two chunks on lands in its region
        heads_dout = exchange.stacked(arrived[0], -3)
        heads_dlse = None if dlse is None else exchange.gather(arrived[1], -1)[..., :rows].contiguous()
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


def _row_pieces(source: Rows, ranks: int, piece_bytes: int) -> list[torch.Tensor | None] | None:
    """Each rank's piece of `source` (`piece_bytes` of its rows) as contiguous bytes of its tensor,
    None where the piece runs past the rows' end (laid out, zeros after them); None for all where
    a dim before the rows is wider than one or the tensor is strided (every piece laid out)."""
    x, dim = source.x, source.dim
    rows = x.shape[dim]
    if not rows or not x.is_contiguous() or any(n != 1 for n in x.shape[:dim]):
        return None
    row_bytes = x.numel() * x.element_size() // rows
    size = piece_bytes // row_bytes
    if size * row_bytes != piece_bytes or rows > ranks * size:
        return None
    return [x.narrow(dim, j * size, size).reshape(-1).view(torch.uint8) if (j + 1) * size <= rows else None for j in range(ranks)]


def _pitched_pieces(source: torch.Tensor) -> list[torch.Tensor] | None:
    """Each row of `source` (u, ...) as it lies, where each is pitched rows; else None (laid out)."""
    rows = list(source.unbind(0))
    return rows if all(pitched_rows(row) is not None for row in rows) else None


def _put_rows(dest: torch.Tensor, x: torch.Tensor, dim: int) -> None:
    """x's rows along `dim` into dest (u, ...), piece j in dest[j]; rows past x's end zero."""
    size, rows = dest.shape[dim], x.shape[dim]
    whole, rest = divmod(rows, size)
    if whole:
        dest[:whole].copy_(x.narrow(dim, 0, whole * size).unflatten(dim, (whole, size)).movedim(dim - 1, 0))
    if rest:
        dest[whole].narrow(dim, 0, rest).copy_(x.narrow(dim, whole * size, rest))
        dest[whole].narrow(dim, rest, size - rest).zero_()
    if whole + bool(rest) < dest.shape[0]:
        dest[whole + bool(rest) :].zero_()


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
