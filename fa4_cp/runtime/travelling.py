"""What travels around the ring: KV ahead of the compute, and the dK/dV partial sums behind it.

A plan's KV streams (rows.KVStream) move each on its own: the dense ring has one, the whole of K
and V; the balanced document layout has one each way, each carrying only the rows that some rank
still reads, a shrinking prefix. Everything lives in the transport's persistent buffers (reused by
every step and call), which each object slices once per call into the plan's kv sides, so a step
only indexes. A buffer holds K and V (or dK and dV) stacked, each as wide as the wider of the two
head dims: where v's head_dim is narrower (MLA's 192 / 128), V's rows are the first columns of its
half. A hop that carries part of a buffer moves its K rows and its V rows as two pieces, which
start at the same offsets on every rank.
"""

from __future__ import annotations

import math

import torch

from ..comm.streams import Arrival, post_hop
from ..comm.transport import Transport
from ..comm.watchdog import Hop
from ..kernels.interface import IndexedSums
from ..plan.rows import KVStream, RankPlan

KV_CHANNEL = 0
DKV_CHANNEL = 1
KV_HOPS_AHEAD = 4
"""How far the hops of a stream of some rows run ahead of the compute, at most. bench/ring_model.py,
on replayed ranks with the copy engine's fitted hops: fine-tuning-like W = 64 0.545 -> 0.668 of
one device with transfers, pretraining-like 8 x 8 0.813 -> 0.932 (one step ahead -> four)."""
KV_AHEAD_BYTES = 512 * 2**20
"""What a stream's buffers past the first two may take: a long sequence's spread documents make
large buffers, and the hops ahead pay most where the steps are short."""


def pair_views(pair: torch.Tensor, k_head_dim: int, v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of a stacked (2, ..., width) pair, each its own head_dim's first columns."""
    if k_head_dim == v_head_dim == pair.shape[-1]:
        return pair[0], pair[1]
    return pair[0][..., :k_head_dim], pair[1][..., :v_head_dim]


def _sides(pair: tuple[torch.Tensor, torch.Tensor], plan: RankPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) or (dK, dV) rows of every kv side of the plan."""
    return [(pair[0], pair[1]) if rows is None else (pair[0][..., rows, :, :], pair[1][..., rows, :, :]) for rows in plan.kv_sides]


def pair_shape(k: torch.Tensor, v: torch.Tensor, rows: int | None = None) -> tuple[int, ...]:
    """(2, ..., rows, h_kv, width) of a K/V or dK/dV pair, width the wider head_dim."""
    return (2, *k.shape[:-3], k.shape[-3] if rows is None else rows, k.shape[-2], max(k.shape[-1], v.shape[-1]))


def _buffer_shape(plan: RankPlan, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """The shape of every stream's buffers: the same on every rank."""
    capacities = [k.shape[-3] if stream.capacity is None else stream.capacity for stream in plan.streams]
    return pair_shape(k, v, max(capacities))


def _pieces(pair: torch.Tensor, rows: int | None) -> list[torch.Tensor]:
    """What a hop moves of a stacked pair: all of it, or the first `rows` of each half."""
    return [pair] if rows is None else [half.narrow(-3, 0, rows) for half in pair]


def _moves(plan: RankPlan, stream: KVStream) -> bool:
    """Whether the stream ever leaves its rank (not on a ring of one, nor when it is read at
    step 0 only)."""
    return plan.world_size > 1 and any(step % plan.world_size for step in stream.steps)


def _copy_own_rows(held: torch.Tensor, own: torch.Tensor, stream: KVStream) -> None:
    """The rank's K or V rows of the stream, at the start of `held`."""
    if stream.own_rows is None:
        held.narrow(-3, 0, own.shape[-3]).copy_(own)
        return
    rows = stream.own_rows.numel()
    target = held.narrow(-3, 0, rows)
    if target.is_contiguous():
        torch.index_select(own, own.dim() - 3, stream.own_rows, out=target)  # gathered in place
    else:  # V narrower than the buffer (MLA): its rows are strided
        target.copy_(own.index_select(own.dim() - 3, stream.own_rows))


class _StreamKV:
    """One stream's KV: the rank's own rows copied into the first of its buffers, then moved from
    one of the stream's steps to the next, each hop into the next buffer in turn. With b buffers a
    hop runs up to b - 1 steps ahead of the compute: it is posted as soon as the kernels that last
    read its buffer are queued (a hop waits for the work queued before it), and the compute waits
    for it only at the step that reads it. Hops go one after another, in the same order on every
    rank, so each sends what the one before it brought."""

    def __init__(self, plan: RankPlan, stream: KVStream, transport: Transport, slots: list[torch.Tensor] | None, k, v):
        self.plan, self.stream, self.transport = plan, stream, transport
        # index into steps of what is held; own KV at `first`: 0 where step 0 reads it, else -1 (unread)
        self.first = self.position = self.posted = 0 if stream.steps and stream.steps[0] == 0 else -1
        self.arrivals: dict[int, Arrival] = {}  # position -> the hop into it, not yet waited for
        if slots is None:  # read the caller's K and V in place
            self.slots, self.sides = [], [_sides((k, v), plan)]
            return
        self.slots = slots
        pairs = [pair_views(slot, k.shape[-1], v.shape[-1]) for slot in slots]
        for held, own in zip(pairs[0], (k, v)):
            _copy_own_rows(held, own, stream)
        # The rows past what a rank copies or a hop lands are left as they are: the pool keeps them
        # finite (comm.buffers), which is all that the kernels' tile overhang needs.
        self.sides = [_sides(pair, plan) for pair in pairs]

    def _slot(self, position: int) -> int:
        return (position - self.first) % len(self.slots) if self.slots else 0

    def held(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sides[self._slot(self.position)][side]

    def before_step(self, step: int) -> None:
        """At the start of plan step `step`: the stream's KV for this step is held (a hop that no
        earlier step could hide waits here), and every hop whose buffer is free is posted."""
        if not self.slots:
            return
        steps, following = self.stream.steps, self.position + 1
        if following < len(steps) and steps[following] == step:
            self._post_through(following)
            arrival = self.arrivals.pop(following, None)
            if arrival is not None:
                arrival.arrive()
            self.position = following
        # the last position whose readers are queued: a buffer held for an earlier step, or never read
        read = self.position - 1 if self.position >= 0 and steps[self.position] == step else self.position
        self._post_through(min(read + len(self.slots), len(steps) - 1))

    def _post_through(self, last: int) -> None:
        while self.posted < last:
            self._post(self.posted + 1)
            self.posted += 1

    def _post(self, position: int) -> None:
        stream, plan = self.stream, self.plan
        rank, world = plan.rank, plan.world_size
        if not self.transport.stream_ordered:
            # a send takes its buffer as it is when posted: the hop that fills it lands first
            for earlier in sorted(self.arrivals):
                self.arrivals.pop(earlier).arrive()
        here = 0 if position - 1 < 0 else stream.steps[position - 1]
        offset = stream.direction * (stream.steps[position] - here)
        sent = stream.rows(stream.origin(rank, world, position - 1), position)
        received = stream.rows(stream.origin(rank, world, position), position)
        into = self.slots[self._slot(position)]
        hop = Hop("KV", here, offset, rank, world)
        self.arrivals[position] = post_hop(
            self.transport, _pieces(self.slots[self._slot(position - 1)], sent), _pieces(into, received), offset, KV_CHANNEL, hop,
        )


class TravellingKV:
    """Every stream of the plan: `held(stream, side)` is what a block reads."""

    def __init__(self, plan: RankPlan, transport: Transport, k: torch.Tensor, v: torch.Tensor):
        shape = _buffer_shape(plan, k, v)
        buffer_bytes = math.prod(shape) * k.element_size()
        counts = [_kv_buffers(plan, stream, buffer_bytes) if _moves(plan, stream) else 0 for stream in plan.streams]
        slots = transport.buffers(KV_CHANNEL, sum(counts), shape, k.dtype, k.device) if any(counts) else []
        self.streams = []
        for stream, count in zip(plan.streams, counts):
            self.streams.append(_StreamKV(plan, stream, transport, slots[:count] if count else None, k, v))
            slots = slots[count:]

    def held(self, stream: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streams[stream].held(side)

    def before_step(self, step: int) -> None:
        for stream in self.streams:
            stream.before_step(step)


def _kv_buffers(plan: RankPlan, stream: KVStream, buffer_bytes: int) -> int:
    """Buffers of a moving stream: two for the whole K and V (the dense ring's steps cost alike,
    so a hop a step ahead hides behind each); for a stream of some rows (the balanced layout, whose
    ranks' steps cost unalike) one per hop up to KV_HOPS_AHEAD + 1, so that a rank's long step does
    not hold up the hops that its neighbours' short ones wait for (bench/ring_model.py), as many of
    the buffers past two as fit in KV_AHEAD_BYTES."""
    if stream.held_rows is None:
        return 2
    hops = len(stream.steps) - (1 if stream.steps[0] == 0 else 0)
    return 2 + max(0, min(KV_HOPS_AHEAD - 1, hops - 1, KV_AHEAD_BYTES // max(buffer_bytes, 1)))


class _StreamDKV:
    """One stream's dK/dV partial sums in the accumulator dtype, added to by the kernels in place,
    two of the stream's steps behind the KV they belong to.

    The stream's steps take turns between two chains. A chain's buffer starts at its first step,
    written by the first block where that block covers it (else its rows zeroed); each later step's
    kernels add into the buffer that arrived from the rank that held the same KV two steps
    earlier, and the buffer then leaves for the rank that will hold that KV two steps on (home
    after the last two). So a hop has a whole step of compute to land, and a step launches only
    its kernels: no zeroing, no adds. Four buffers rotate (one computing, one received for the
    next step, one sent, one receiving), in the same order on every rank.

    A stream of some rows, whose KV hops shrink, has its chains shrink with them: of a chain's
    rows, those that the KV of its next step still holds go on, and the rest, which no later step
    touches, go home at once, into the owner's home buffer for that chain (two more buffers), where
    a chain's pieces fill disjoint rows: nothing is added.
    """

    SLOTS = 4

    def __init__(self, plan: RankPlan, stream: KVStream, transport: Transport, slots: list[torch.Tensor], k, v):
        self.plan, self.stream, self.transport = plan, stream, transport
        self.hops = _chain_hops(plan, stream)
        self.shrinks = stream.held_rows is not None
        self.slots, self.homes = (slots[: self.SLOTS], slots[self.SLOTS :]) if self.shrinks else (slots, [])
        self.sides = [_sides(pair_views(slot, k.shape[-1], v.shape[-1]), plan) for slot in self.slots]
        self.position = -1  # index into stream.steps of the step computing now
        self.pending: dict[int, Arrival] = {}  # slot -> the hop that fills it
        self.homeward: list[Arrival] = []  # hops into the home buffers
        self.home: list[tuple[torch.Tensor, int | None]] = []  # (buffer, rows) of each chain's sums of the rank's own KV

    @classmethod
    def slot_count(cls, plan: RankPlan, stream: KVStream) -> int:
        if stream.held_rows is not None:
            return cls.SLOTS + 2
        return cls.SLOTS if any(_chain_hops(plan, stream)) else 2

    def _origin(self, position: int) -> int:
        return self.stream.origin(self.plan.rank, self.plan.world_size, position)

    def reads_at(self, step: int) -> bool:
        following = self.position + 1
        return following < len(self.stream.steps) and self.stream.steps[following] == step

    def starts_chain(self) -> bool:
        """Whether the step about to begin is a chain's first (its buffer holds nothing yet)."""
        return self.position + 1 < 2

    def begin_step(self, first_block_writes: bool) -> None:
        """Before the kernels of the stream's next step. A chain's first buffer is zeroed unless
        the step's first block writes all of it."""
        self.position += 1
        slot = self.position % len(self.slots)
        if self.position >= 2:
            self.pending.pop(slot).arrive()
        elif not first_block_writes:
            for piece in _pieces(self.slots[slot], self.stream.rows(self._origin(self.position), self.position)):
                piece.zero_()

    def accumulator(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sides[self.position % len(self.slots)][side]

    def end_step(self) -> None:
        """After the step's kernels: the buffer leaves for its next holder, or home."""
        position, rank, world = self.position, self.plan.rank, self.plan.world_size
        buffer, origin, offset = self.slots[position % len(self.slots)], self._origin(position), self.hops[position]
        rows = self.stream.rows(origin, position)
        if offset == 0:  # the rank's own KV: the chain ends at home
            self.home.append((buffer, rows))
            return
        hop = Hop("dKV", self.stream.steps[position], offset, rank, world)
        last = position + 2 >= len(self.stream.steps)
        # What goes on: the whole buffer, or, shrinking, the rows the next step's KV holds (home
        # itself after the last step, below).
        onward = rows if not self.shrinks else 0 if last else self.stream.rows(origin, position + 2)
        if not (self.shrinks and last):
            landing = (position + 2) % len(self.slots)
            arriving = self.stream.rows(rank, position % 2) if last else self.stream.rows(self._origin(position + 2), position + 2)
            self.pending[landing] = post_hop(self.transport, _pieces(buffer, onward), _pieces(self.slots[landing], arriving), offset, DKV_CHANNEL, hop)
            if last:
                self.home.append((self.slots[landing], arriving))
        if self.shrinks:
            # The rows no later step touches go home; this rank's own come back from whoever holds
            # its KV at this step. Both land at their rows of the chain's home buffer.
            home, home_offset = self.homes[position % 2], -self.stream.direction * self.stream.steps[position] % world
            mine = (0 if last else self.stream.rows(rank, position + 2), self.stream.rows(rank, position))
            self.homeward.append(post_hop(
                self.transport, _row_pieces(buffer, onward, rows), _row_pieces(home, *mine), home_offset, DKV_CHANNEL,
                Hop("dKV home", self.stream.steps[position], home_offset, rank, world), lands_at=_row_pieces(home, onward, rows),
            ))
            if last:
                self.home.append((home, self.stream.rows(rank, position % 2)))

    def at_home(self) -> list[tuple[torch.Tensor, int | None]]:
        """(buffer, rows) of the dK and dV partial sums of this rank's own stream, once the last
        hops have landed: one per chain."""
        for arrival in [*self.pending.values(), *self.homeward]:
            arrival.arrive()
        self.pending, self.homeward = {}, []
        return self.home


def _row_pieces(pair: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
    """Rows start..stop of each half of a stacked pair."""
    return [half.narrow(-3, start, stop - start) for half in pair]


class TravellingDKV:
    """Every stream's dK/dV chains. What comes home is summed by the backward's finish: over k's
    first rows where a stream is the rank's whole K and V, at its own rows where it carries some."""

    def __init__(self, plan: RankPlan, transport: Transport, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        reading = [stream for stream in plan.streams if stream.steps]
        counts = [_StreamDKV.slot_count(plan, stream) for stream in reading]
        slots = transport.buffers(DKV_CHANNEL, sum(counts), _buffer_shape(plan, k, v), dtype, k.device) if reading else []
        self.streams: dict[int, _StreamDKV] = {}
        for index, stream in enumerate(plan.streams):
            if stream.steps:
                count = counts[len(self.streams)]
                self.streams[index] = _StreamDKV(plan, stream, transport, slots[:count], k, v)
                slots = slots[count:]

    def begin_step(self, step: int, first_write: int | None) -> list[int]:
        """Before a step's kernels: the streams it reads, each chain started or arrived (`first_write`:
        the stream whose first block writes its chain's buffer whole)."""
        reading = [index for index, stream in self.streams.items() if stream.reads_at(step)]
        for index in reading:
            self.streams[index].begin_step(first_write == index)
        return reading

    def starts_chain(self, stream: int, step: int) -> bool:
        return stream in self.streams and self.streams[stream].reads_at(step) and self.streams[stream].starts_chain()

    def accumulator(self, stream: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streams[stream].accumulator(side)

    def end_step(self, reading: list[int]) -> None:
        for index in reading:
            self.streams[index].end_step()

    def at_home(self) -> tuple[list[torch.Tensor], list[IndexedSums]]:
        """Once every stream is home: the partial sums over k's first rows, and those of streams of
        some rows, at their rows."""
        travelled, indexed = [], []
        for stream in self.streams.values():
            for buffer, rows in stream.at_home():
                own = stream.stream.own_rows
                if own is None:
                    travelled.append(buffer if rows is None else buffer.narrow(-3, 0, rows))
                elif rows:  # a stream of some rows has held_rows: at most its own rows come home
                    indexed.append(IndexedSums(buffer.narrow(-3, 0, rows), own[:rows], stream.stream.own_positions))
        return travelled, indexed


def _chain_hops(plan: RankPlan, stream: KVStream) -> list[int]:
    """Per step of the stream, how far its dK/dV buffer moves: to the rank holding the same KV two
    of the stream's steps later, or home; 0 when it is home already (the rank's own KV)."""
    steps = stream.steps
    return [
        stream.direction * ((steps[position + 2] if position + 2 < len(steps) else 0) - step) % plan.world_size
        for position, step in enumerate(steps)
    ]
