"""The Ulysses all-to-all, posted now and waited for later, so that the ring's compute runs while
it moves. Over a transport that copies straight into its peers' buffers (the copy engine: no SM
takes part; the simulated ring) it is u - 1 shifts, rank r's pieces for rank r + o landing in row
r of that rank's receive regions, on the hops' stream (`post_all_to_all_parts`: each piece from
where it lies, contiguous or pitched rows; each part into a region of its own, so that what
arrives of a part is one tensor; from there, on the same stream, into its place if it has one).
Over NCCL or gloo the group's all_to_all_single runs it, at once, on one send buffer
(`post_all_to_all`; the stream-ordered fallback: no overlap)."""

from __future__ import annotations

import functools

import torch

from .buffers import aligned
from .group import RingGroup
from .pitched import copy_piece
from .streams import Arrival, post_hop
from .transport import Transport
from .watchdog import Hop

ALL_TO_ALL_CHANNEL = 2


class PendingAllToAll:
    def __init__(self, arrivals: list[Arrival], send: list[list[torch.Tensor]] | None, received: torch.Tensor | list[torch.Tensor]):
        self._arrivals, self._send, self._received = arrivals, send, received

    def wait(self) -> torch.Tensor | list[torch.Tensor]:
        """(u, piece bytes) (one per part for `post_all_to_all_parts`): row j what rank j sent here
        (this rank's own row included). The current stream waits for it; what was sent is let go
        only then, so that the allocator cannot hand it out while a copy still reads it."""
        for arrival in self._arrivals:
            arrival.arrive()
        self._arrivals, self._send = [], None
        return self._received


def receive_regions(group: RingGroup, transport: Transport | None, piece_bytes: list[int], device: torch.device) -> list[torch.Tensor | None]:
    """One (u, piece bytes) receive region per exchange of `piece_bytes`, disjoint, carved from the
    transport's all-to-all buffer (kept across calls): exchanges in flight together need regions of
    their own. None each where the group's collective runs the exchange."""
    if transport is None or not transport.copies_into_peers:
        return [None] * len(piece_bytes)
    ranks = group.world_size
    sizes = [aligned(ranks * size) for size in piece_bytes]  # each region starts aligned: typed views of it may be taken
    arena = transport.buffers(ALL_TO_ALL_CHANNEL, 1, (sum(sizes),), torch.uint8, device)[0]
    regions, start = [], 0
    for size, piece in zip(sizes, piece_bytes):
        regions.append(arena[start : start + ranks * piece].view(ranks, piece))
        start += size
    return regions


def post_all_to_all(group: RingGroup, transport: Transport | None, send: torch.Tensor, what: str) -> PendingAllToAll:
    """Row j of `send` (u, piece bytes; contiguous) to rank j through the group's collective, at
    once; on a group of one (no transport) `send` is what arrives. A transport that copies into
    its peers takes `post_all_to_all_parts` instead."""
    if transport is None:
        return PendingAllToAll([], None, send)
    return PendingAllToAll([], None, group.all_to_all(send, what))


def post_all_to_all_parts(
    transport: Transport, sends: list[list[torch.Tensor]], regions: list[torch.Tensor], what: str,
    places: list[torch.Tensor | None] | None = None, arriving: list[int] | None = None,
) -> PendingAllToAll:
    """Start sending `sends[j]` (one piece per part: contiguous, or pitched rows) to rank j, on a
    transport that copies into its peers: part p lands in row (this rank) of rank j's `regions[p]`
    (u, piece bytes each, carved from a receive region of receive_regions, every rank alike), at
    its start: `arriving[p]` bytes from each peer, where given (a short piece), else the row.
    Where `places[p]` (u, ...) is given, what arrives of part p from rank j is copied on into its
    row j as soon as it is here (`place_arrived`), behind the transfer on its stream; this rank's
    own piece is copied there straight away."""
    ranks, rank = transport.world_size, transport.rank
    places = None if places is None or all(place is None for place in places) else places
    arriving = [region.shape[1] for region in regions] if arriving is None else arriving
    mine = [region[rank, :nbytes] for region, nbytes in zip(regions, arriving)]  # where this rank's pieces land on each peer
    arrivals = []
    for offset in range(ranks):
        source = (rank - offset) % ranks
        landed = [region[source, :nbytes] for region, nbytes in zip(regions, arriving, strict=True)]
        if places is None:
            recvs, then = landed, None
        elif offset == 0:  # this rank's own pieces go straight to their places
            recvs, then = [piece if place is None else place[rank] for piece, place in zip(landed, places)], None
        else:
            recvs, then = landed, functools.partial(place_arrived, landed, [None if place is None else place[source] for place in places])
        arrivals.append(post_hop(
            transport, sends[(rank + offset) % ranks], recvs, offset, ALL_TO_ALL_CHANNEL,
            Hop(what, 0, offset, rank, ranks), lands_at=mine, then=then,
        ))
    return PendingAllToAll(arrivals, sends, regions)


def place_arrived(landed: list[torch.Tensor], places: list[torch.Tensor | None]) -> None:
    """Each piece that landed (a row of bytes of a receive region) into its place, where it has
    one: on a GPU the copy engine's copies, on the stream the transfer ran on (bench/gpu_work.py
    times them apart)."""
    for piece, place in zip(landed, places, strict=True):
        if place is not None and place.numel():
            copy_piece(place, piece)
