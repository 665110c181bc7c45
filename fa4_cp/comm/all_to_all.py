"""The Ulysses all-to-all. Over a transport that copies straight into its peers' buffers (the
copy engine: no SM takes part; the simulated ring) it is u - 1 shifts, rank r's piece for rank
r + o landing in that rank's slot r. Over NCCL or gloo the group's all_to_all_single runs it."""

from __future__ import annotations

import torch

from .group import RingGroup
from .streams import post_hop
from .transport import Transport
from .watchdog import Hop

ALL_TO_ALL_CHANNEL = 2


def all_to_all(group: RingGroup, transport: Transport, pieces: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """`pieces[j]` (contiguous, one shape) to rank j; what each rank sent here, in rank order. On
    the transport's path the result is the transport's buffers (and this rank's own piece itself),
    valid until its next all-to-all."""
    if not transport.copies_into_peers:
        return group.all_to_all(pieces, what)
    ranks, rank = transport.world_size, transport.rank
    slots = transport.buffers(ALL_TO_ALL_CHANNEL, ranks, tuple(pieces[0].shape), pieces[0].dtype, pieces[0].device)
    arrivals = [
        post_hop(
            transport, [pieces[(rank + offset) % ranks]], [slots[(rank - offset) % ranks]], offset, ALL_TO_ALL_CHANNEL,
            Hop(what, 0, offset, rank, ranks), lands_at=[slots[rank]],
        )
        for offset in range(1, ranks)
    ]
    for arrival in arrivals:
        arrival.arrive()
    return [pieces[rank] if source == rank else slot for source, slot in enumerate(slots)]  # no copy of our own piece
