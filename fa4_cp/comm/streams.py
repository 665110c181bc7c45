"""How the executor posts a hop and waits for it.

On a stream-ordered (GPU) transport, a hop runs on a dedicated comm stream: the comm stream first
waits for the compute stream's work so far (the send buffer is written, the receive buffer no
longer read), the transfer is enqueued, and an event marks its completion. `arrive` makes the
compute stream wait on that event: the host never blocks inside the ring loop. Elsewhere (gloo,
the simulated ring) the host waits at `arrive`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .transport import PendingShift, Transport
from .watchdog import Hop


class Arrival:
    def __init__(self, pending: list[PendingShift], then: Callable[[], None] | None = None):
        self._pending, self._then = pending, then

    def arrive(self) -> None:
        for shift in self._pending:
            shift.wait()
        if self._then is not None:
            then, self._then = self._then, None
            then()


class _StreamArrival(Arrival):
    def __init__(self, done: torch.cuda.Event):
        self._done = done

    def arrive(self) -> None:
        torch.cuda.current_stream().wait_event(self._done)


@functools.cache
def comm_stream(device: torch.device) -> torch.cuda.Stream:
    # High priority: a hop's few tiny operations should not queue behind attention blocks.
    return torch.cuda.Stream(device=device, priority=-1)


def post_hop(
    transport: Transport, sends: list[torch.Tensor], recvs: list[torch.Tensor], offset: int, channel: int, hop: Hop,
    lands_at: list[torch.Tensor] | None = None, then: Callable[[], None] | None = None,
) -> Arrival:
    """Start moving `sends` (a hop's pieces, e.g. the K and V rows it carries) `offset` ranks on
    into the peer's matching `recvs`, as one transfer (Transport.shift), each landing where its
    `lands_at` view is, if given; `hop` names it in errors. `then` runs once the data is here:
    on the comm stream, before the hop counts as arrived (stream-ordered), else at `arrive`."""
    if not transport.stream_ordered:
        return Arrival([transport.shift(sends, recvs, offset, channel, lands_at)], then)
    device = sends[0].device
    comm = comm_stream(device)
    comm.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(comm):
        transport.shift(sends, recvs, offset, channel, lands_at).wait()
        if then is not None:
            then()
        done = torch.cuda.Event()
        done.record(comm)
    transport.watchdog.track(done, hop)
    return _StreamArrival(done)
