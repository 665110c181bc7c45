"""The Ulysses stage's exchanges: what one all-to-all carries (typed parts side by side in one row
of bytes per rank), how each part is sent (from where it lies wherever the transport allows, else
laid out into a send buffer), and where what arrives goes (its place: the heads or rows of a
tensor of the receiving rank). runtime/ulysses.py runs them around the ring; comm/all_to_all.py
moves the bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..comm.all_to_all import PendingAllToAll, post_all_to_all, post_all_to_all_parts, receive_regions
from ..comm.buffers import aligned
from ..comm.group import RingGroup
from ..comm.pitched import pitched_rows
from ..comm.transport import TransportKind

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
        arrives, and its pieces are sent from where they lie, where pitched rows describe them: a
        (u, ...) tensor's rows (a head group of q, k, v or dout), a Rows source's pieces (short or
        empty past its rows' end, the rest of their place zeroed). Only the others are laid out.
        On a GPU the copy engine makes the pitched copies, the sender's and the receiver's: no SM
        takes part."""
        places = [None] * len(sources) if places is None else list(places)
        if region is None:
            send = self._send_buffer(parts)
            self.lay_out(parts.views(send), sources)
            return PendingExchange(post_all_to_all(self.group, self.transport, send, "the Ulysses all-to-all"), parts, False, places)
        send = views = None  # made once some part is laid out
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.ranks)]
        arriving = [parts.piece_bytes(part) for part in range(len(sources))]
        for part, source in enumerate(sources):
            direct = _row_pieces(source, self.ranks, parts.piece_bytes(part)) if isinstance(source, Rows) else _pitched_pieces(source)
            if direct is None:
                if send is None:
                    send = self._send_buffer(parts)
                    views = parts.views(send)
                self.lay_out([views[part]], [source])
                start = parts.offsets[part]
                direct = [send[j, start : start + parts.piece_bytes(part)] for j in range(self.ranks)]
            elif isinstance(source, Rows):  # pieces past the rows' end arrive short; the rest of their place is zeros
                size, rows = parts.shapes[part][0][source.dim], source.x.shape[source.dim]
                here = min(max(rows - self.group.rank * size, 0), size)
                arriving[part] = parts.piece_bytes(part) // size * here
                if places[part] is not None and here < size:
                    places[part].narrow(source.dim, here, size - here).zero_()
                    places[part] = places[part].narrow(source.dim, 0, here)
            for j in range(self.ranks):
                pieces[j].append(direct[j])
        regions = parts.part_regions(region)
        pending = post_all_to_all_parts(self.transport, pieces, regions, "the Ulysses all-to-all", places, arriving)
        return PendingExchange(pending, parts, True, places)

    def _send_buffer(self, parts: Parts) -> torch.Tensor:
        return torch.empty((self.ranks, parts.nbytes), dtype=torch.uint8, device=self.device)

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
        rows_place(into, pieces.shape[0], dim).copy_(pieces)
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


def _row_pieces(source: Rows, ranks: int, piece_bytes: int) -> list[torch.Tensor] | None:
    """Each rank's piece of `source` (`piece_bytes` of its rows) as it lies: those past the rows'
    end short or empty (the ring rank's rows padded to a multiple of u). None where pitched rows
    do not describe them (contiguous; or, with a batch dim or several heads before the rows, one
    run of rows in each): every piece laid out."""
    x, dim = source.x, source.dim
    rows = x.shape[dim]
    if not rows:
        return None
    row_bytes = x.numel() * x.element_size() // rows
    size = piece_bytes // row_bytes
    if size * row_bytes != piece_bytes or rows > ranks * size:
        return None
    pieces = [x.narrow(dim, min(j * size, rows), min(max(rows - j * size, 0), size)) for j in range(ranks)]
    if any(piece.numel() and pitched_rows(piece) is None for piece in pieces):
        return None
    return pieces


def _pitched_pieces(source: torch.Tensor) -> list[torch.Tensor] | None:
    """Each row of `source` (u, ...) as it lies, where each is pitched rows; else None (laid out)."""
    rows = source.unbind(0)  # one shape and strides: the first row's answer is every row's
    return list(rows) if pitched_rows(rows[0]) is not None else None


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
