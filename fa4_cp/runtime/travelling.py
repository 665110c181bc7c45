"""What travels around the ring: KV ahead of the compute, and the dK/dV partial sums behind it.

Both live in the transport's persistent buffers (reused by every step and call) and move by one
hop at a time on the transport's channels. Each object slices its buffers once per call into
the plan's kv sides, so a step only indexes. A buffer holds K and V (or dK and dV) stacked, each
as wide as the wider of the two head dims: where v's head_dim is narrower (MLA's 192 / 128), V's
rows are the first columns of its half.
"""

from __future__ import annotations

import torch

from ..comm.streams import Arrival, post_hop
from ..comm.transport import Transport
from ..comm.watchdog import Hop
from ..plan.rows import RankPlan

KV_CHANNEL = 0
DKV_CHANNEL = 1


def pair_views(pair: torch.Tensor, k_head_dim: int, v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of a stacked (2, ..., width) pair, each its own head_dim's first columns."""
    if k_head_dim == v_head_dim == pair.shape[-1]:
        return pair[0], pair[1]
    return pair[0][..., :k_head_dim], pair[1][..., :v_head_dim]


def _sides(pair: tuple[torch.Tensor, torch.Tensor], plan: RankPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) or (dK, dV) rows of every kv side of the plan."""
    return [(pair[0], pair[1]) if rows is None else (pair[0][..., rows, :, :], pair[1][..., rows, :, :]) for rows in plan.kv_sides]


def travelling_rows(t: torch.Tensor, plan: RankPlan) -> torch.Tensor:
    """The rows of a k-shaped tensor that travel (the first `plan.travel_len`, or all)."""
    return t if plan.travel_len is None else t.narrow(-3, 0, plan.travel_len)


def pair_shape(k: torch.Tensor, v: torch.Tensor, rows: int | None = None) -> tuple[int, ...]:
    """(2, ..., rows, h_kv, width) of a K/V or dK/dV pair, width the wider head_dim."""
    return (2, *k.shape[:-3], k.shape[-3] if rows is None else rows, k.shape[-2], max(k.shape[-1], v.shape[-1]))


def buffer_shape(k: torch.Tensor, v: torch.Tensor, plan: RankPlan) -> tuple[int, ...]:
    """The shape of a travelling buffer pair: the same on every rank."""
    return pair_shape(k, v, plan.buffer_len)


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
        buffers = transport.buffers(KV_CHANNEL, 2, buffer_shape(k, v, plan), k.dtype, k.device)
        self.buffers, pairs = buffers, [pair_views(buffer, k.shape[-1], v.shape[-1]) for buffer in buffers]
        for held, own in zip(pairs[0], (k, v)):
            sent = travelling_rows(own, plan)
            held.narrow(-3, 0, sent.shape[-3]).copy_(sent)
            # Rows past this rank's own travel with it and fall inside the kernels' tiles, masked:
            # a masked score's zero times a NaN left in the buffer is NaN, so they must be finite.
            held.narrow(-3, sent.shape[-3], held.shape[-3] - sent.shape[-3]).zero_()
        self.sides = [_sides(pair, plan) for pair in pairs]

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
    """dK/dV partial sums in the accumulator dtype, added to by the kernels in place, two active
    steps behind the KV they belong to.

    The steps that compute against travelling KV take turns between two chains. A chain's buffer
    starts at its first step, written by the first block where that block covers it (else
    zeroed); each later step's kernels add into the buffer that arrived
    from the rank that held the same KV two steps earlier, and the buffer then leaves for the rank
    that will hold that KV two steps on (home after the last two). So a hop has a whole step of
    compute to land, and a step launches only its kernels: no zeroing, no adds. The rank's own
    sum is the two chains' last buffers, added once per call (with the local sums, in the
    backward pass's `finish_dkv`). Four buffers rotate (one computing,
    one received for the next step, one sent, one receiving), in the same order on every rank.
    """

    SLOTS = 4

    def __init__(self, plan: RankPlan, transport: Transport, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        self.plan, self.transport = plan, transport
        self.order = travelling_steps(plan)
        self.hops = _chain_hops(plan, self.order)
        count = self.SLOTS if any(self.hops) else 2
        self.slots = transport.buffers(DKV_CHANNEL, count, buffer_shape(k, v, plan), dtype, k.device)
        self.sides = [_sides(pair_views(slot, k.shape[-1], v.shape[-1]), plan) for slot in self.slots]
        self.position = -1  # index into self.order of the step computing now
        self.pending: dict[int, Arrival] = {}  # slot -> the hop that fills it
        self.finals: list[torch.Tensor] = []  # the chains' last buffers kept here: own KV, no hop home

    def begin_step(self, first_block_writes: bool) -> None:
        """Before the kernels of the next travelling step. A chain's first buffer is zeroed
        unless the step's first block writes all of it."""
        self.position += 1
        slot = self.position % len(self.slots)
        if self.position >= 2:
            self.pending.pop(slot).arrive()
        elif not first_block_writes:
            self.slots[slot].zero_()

    @property
    def starts_chain(self) -> bool:
        """Whether the step about to begin is a chain's first (its buffer holds nothing yet)."""
        return self.position + 1 < 2

    def accumulator(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dK, dV) rows of a kv side that this step's kernels add into."""
        return self.sides[self.position % len(self.slots)][side]

    def end_step(self) -> None:
        """After the step's kernels: the buffer leaves for its next holder, or home."""
        offset, slot = self.hops[self.position], self.position % len(self.slots)
        if offset == 0:
            self.finals.append(self.slots[slot])
            return
        landing = (self.position + 2) % len(self.slots)
        hop = Hop("dKV", self.plan.steps[self.order[self.position]].step, offset, self.plan.rank, self.plan.world_size)
        self.pending[landing] = post_hop(self.transport, self.slots[slot], self.slots[landing], offset, DKV_CHANNEL, hop)

    def at_home(self) -> list[torch.Tensor]:
        """The (2, ...) dK and dV partial sums of this rank's own travelling rows (its first rows),
        once the last hops have landed: the chains' last buffers (transport buffers), none when
        nothing travelled. The backward pass adds them into its finished dK and dV."""
        for arrival in self.pending.values():
            arrival.arrive()
        parts = self.finals + [self.slots[slot] for slot in self.pending]
        self.pending = {}
        return [travelling_rows(part, self.plan) for part in parts]


def travelling_steps(plan: RankPlan) -> tuple[int, ...]:
    """Indices of the plan's steps whose kernels may read travelling KV, the same on every rank."""
    return tuple(range(1 if plan.local_first_step else 0, len(plan.steps)))


def _chain_hops(plan: RankPlan, order: tuple[int, ...]) -> list[int]:
    """Per travelling step, how far its dK/dV buffer moves: to the rank holding the same KV two
    travelling steps later, or home; 0 when it is home already (the rank's own KV)."""
    steps = [plan.steps[index].step for index in order]
    return [
        (steps[position + 2] - step if position + 2 < len(steps) else -step) % plan.world_size
        for position, step in enumerate(steps)
    ]
