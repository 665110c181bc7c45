"""What travels around the ring: KV ahead of the compute, and the dK/dV partial sums behind it.

Both live in the transport's persistent buffers (reused by every step and call) and move by one
hop at a time on the transport's channels. Each object slices its buffers once per call into
the plan's kv sides, so a step only indexes.
"""

from __future__ import annotations

import torch

from ..comm.streams import Arrival, post_hop
from ..comm.transport import Transport
from ..comm.watchdog import Hop
from ..plan.rows import RankPlan

KV_CHANNEL = 0
DKV_CHANNEL = 1


def _sides(pair: torch.Tensor | tuple[torch.Tensor, torch.Tensor], plan: RankPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) or (dK, dV) rows of every kv side of the plan."""
    return [(pair[0], pair[1]) if rows is None else (pair[0][..., rows, :, :], pair[1][..., rows, :, :]) for rows in plan.kv_sides]


def travelling_rows(t: torch.Tensor, plan: RankPlan) -> torch.Tensor:
    """The rows of a k-shaped tensor that travel (the first `plan.travel_len`, or all)."""
    return t if plan.travel_len is None else t.narrow(-3, 0, plan.travel_len)


def buffer_shape(like: torch.Tensor, plan: RankPlan) -> tuple[int, ...]:
    """(2, rows, ...) of a travelling buffer pair for k-shaped `like`: the same on every rank."""
    rows = like.shape[-3] if plan.buffer_len is None else plan.buffer_len
    return (2, *like.shape[:-3], rows, *like.shape[-2:])


def moves(plan: RankPlan) -> bool:
    """Whether anything leaves this rank in the call (not on a ring of one, nor when every
    document is kept whole)."""
    return plan.world_size > 1 and (plan.first_offset > 0 or any(step.next_offset for step in plan.steps))


class TravellingKV:
    """Local K and V copied into the first of two buffers, then moved from step to step: the
    next hop is posted before a step's compute, into the other buffer."""

    def __init__(self, plan: RankPlan, transport: Transport, k: torch.Tensor, v: torch.Tensor):
        self.plan, self.transport = plan, transport
        self.current, self.step = 0, 0
        self.pending: Arrival | None = None
        if not moves(plan):  # read the caller's K and V in place
            self.sides = [_sides((travelling_rows(k, plan), travelling_rows(v, plan)), plan)]
            return
        self.buffers = transport.buffers(KV_CHANNEL, 2, buffer_shape(k, plan), k.dtype, k.device)
        for held, own in zip(self.buffers[0], (k, v)):
            sent = travelling_rows(own, plan)
            held.narrow(-3, 0, sent.shape[-3]).copy_(sent)
            # Rows past this rank's own travel with it and fall inside the kernels' tiles, masked:
            # a masked score's zero times a NaN left in the buffer is NaN, so they must be finite.
            held.narrow(-3, sent.shape[-3], held.shape[-3] - sent.shape[-3]).zero_()
        self.sides = [_sides(buffer, plan) for buffer in self.buffers]

    def held(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) rows of a kv side, as held now."""
        return self.sides[self.current][side]

    def post(self, offset: int) -> None:
        """Start moving the held KV `offset` ranks on; it is not read until `arrive`."""
        hop = Hop("KV", self.step, offset, self.plan.rank, self.plan.world_size)
        self.pending = post_hop(self.transport, self.buffers[self.current], self.buffers[1 - self.current], offset, KV_CHANNEL, hop)
        self.step += offset

    def arrive(self) -> None:
        if self.pending is not None:
            self.pending.arrive()
            self.pending = None
            self.current = 1 - self.current

    def start(self) -> None:
        """Move the local KV to the plan's first active step."""
        if self.plan.first_offset:
            self.post(self.plan.first_offset)
            self.arrive()


class TravellingDKV:
    """dK/dV partial sums, in the accumulator dtype, moving one step behind the KV.

    Each step computes into a zeroed buffer; once that compute is done the partial sums arriving
    from the previous rank are added, and the total leaves for the next step's rank while that
    step computes (three buffers: one computing, one sent, one received). After the last active
    step each partial sum jumps home to its owner in one hop.
    """

    def __init__(self, plan: RankPlan, transport: Transport, like: torch.Tensor, dtype: torch.dtype):
        self.plan, self.transport = plan, transport
        count = 3 if moves(plan) else 1
        self.free = transport.buffers(DKV_CHANNEL, count, buffer_shape(like, plan), dtype, like.device)
        self.sides = {buffer.data_ptr(): _sides(buffer, plan) for buffer in self.free}
        self.computing = self.free.pop()
        self.in_flight: tuple[Arrival, torch.Tensor, torch.Tensor] | None = None

    def begin_step(self) -> None:
        self.computing.zero_()

    def accumulator(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dK, dV) rows of a kv side that this step adds into."""
        return self.sides[self.computing.data_ptr()][side]

    def end_step(self, step: int, offset: int) -> None:
        """Fold in the partials that arrived, then send the sum `offset` ranks on (0: keep it)."""
        if self.in_flight is not None:
            pending, sent, received = self.in_flight
            pending.arrive()
            self.computing += received
            self.free += [sent, received]
            self.in_flight = None
        if offset == 0:
            return
        target = self.free.pop()
        hop = Hop("dKV", step, offset, self.plan.rank, self.plan.world_size)
        self.in_flight = (post_hop(self.transport, self.computing, target, offset, DKV_CHANNEL, hop), self.computing, target)
        self.computing = self.free.pop()

    def at_home(self) -> torch.Tensor:
        """(2, ...) dK and dV of this rank's own travelling rows, once the last hop has arrived."""
        if self.in_flight is None:
            home = self.computing
        else:
            pending, _, home = self.in_flight
            pending.arrive()
        return home if self.plan.travel_len is None else home.narrow(-3, 0, self.plan.travel_len)
