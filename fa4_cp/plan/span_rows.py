"""One rank's plan for the balanced document layout (placement.py): every document's span is its
own small zigzag ring whose KV goes both ways round it, and each step gathers the sequences of all
documents that meet there into a few varlen blocks.

A document spread over g ranks has members 0..g-1 (ranks first..first + g - 1, mod W); member i
holds chunks i and 2g - 1 - i. Member i reads member j's chunks at step |i - j|: from the forward
stream (direction +1, rank - step's KV) when j < i, from the backward stream (-1, rank + step's)
when j > i. So a span of g takes steps 1..g-1, where a one-way ring takes 1..g-1 and
W-g+1..W-1, and a document's KV goes only to the members of its span. Each stream carries, of
each document, the lanes that some member reads from it (causal: a member's first chunk forward,
both chunks backward), ordered by the last step that reads them: every hop carries a prefix of
the stream that shrinks as it goes, and a step that no span reaches is skipped with its hop
(rows.KVStream). The calls between two members' lanes come from the generic chunk-pair planner
(schedule.py), so every mask that the dense ring takes works here too. A kept document meets only
itself, at step 0, where every block reads the rank's own K and V (a local block). The kept
documents are one local block of their own, the only block of their rows (`final`): they follow
the spread documents' chunks in the rank's rows, so the forward may write that tail finished.

Blocks share their q rows: all blocks whose calls take the same run of a document's lanes (both
lanes, or the second, or the first) use one cu_seqlens_q tensor, which lists that run of every
local document (and, between runs, the rows in between as sequences no block computes). A block
selects each sequence whole or not at all, so a backend keeps one dq accumulator per tensor
(`VarlenRows.seqused_q_all`), not one per block. A masked block's sequences all have as many
more keys than queries (`VarlenRows.kv_shift`): a call's documents are split by that difference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..kernels.interface import BandMask, VarlenRows
from .rows import KVStream, PlannedBlock, PlannedStep, RankPlan, unselected_rows
from .schedule import BlockCall, Interval, band_interval, chunk_pair_calls

if TYPE_CHECKING:
    from .placement import BalancedSharding

LOCAL, FORWARD, BACKWARD = -1, 0, 1
DIRECTIONS = (1, -1)  # of the FORWARD and BACKWARD streams


class BlockKey(NamedTuple):
    """What makes calls one block: the same step, stream, mask, run of q lanes, kv shift, and the
    same occurrence of that kind (a second call of a kind is a block of its own)."""

    step: int
    stream: int
    mask: BandMask
    q_lanes: range
    occurrence: int
    kv_shift: int


BOTH = range(0, 2)
KEPT = -1  # BlockKey.occurrence of the kept documents' block


def span_plan(sharding: BalancedSharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    world, band = sharding.world_size, band_interval(mask)
    streams = span_streams(sharding, band)
    blocks: dict[BlockKey, dict[int, tuple[int, int, int]]] = {}  # key -> local sequence -> (q used, kv first row, kv used)
    kept_starts = []
    for sequence, (doc, index, start) in enumerate(sharding.rank_rows[rank]):
        first, ranks = sharding.spans[doc]
        if ranks == 1:
            kept_starts.append(start)
            _add(blocks, BlockKey(0, LOCAL, mask, BOTH, KEPT, 0), sequence, (sharding.doc_lengths[doc], start, sharding.doc_lengths[doc]))
            continue
        for other in range(ranks):
            source = (first + other) % world
            stream, step = _direction(index, other)
            seen: dict = {}
            for call, q_used, kv_used in _reads(sharding, doc, index, other, band):
                occurrence = seen.setdefault((call.mask, call.q_lanes), 0)
                seen[(call.mask, call.q_lanes)] += 1  # a second call of the same kind: a block of its own
                if stream == LOCAL:
                    kv_first = sharding.starts[source][doc] + call.kv_lanes.start * sharding.chunk_size(doc)
                else:
                    kv_first = streams.kv_row(stream, source, doc, call.kv_lanes.start)
                shift = 0 if call.mask.is_full else kv_used - q_used
                _add(blocks, BlockKey(step, stream, call.mask, call.q_lanes, occurrence, shift), sequence, (q_used, kv_first, kv_used))
    table = _SpanRowsTable(sharding, rank, device)
    planned, q_sides = [], [None]  # every row; then each computed prefix's rows (`_computed`)
    for step in streams.plan_steps:
        keys = sorted(
            (key for key in blocks if key.step == step),
            key=lambda key: (key.stream, str(key.mask), key.q_lanes.start, key.q_lanes.stop, key.occurrence, key.kv_shift),
        )
        step_blocks = []
        for key in keys:
            varlen, rows = table.rows(key.q_lanes, blocks[key], sharding.local_len if key.stream == LOCAL else streams.capacity, key.kv_shift)
            side = None if rows is None else slice(0, rows)
            if side not in q_sides:
                q_sides.append(side)
            step_blocks.append(PlannedBlock(
                q_sides.index(side), 0, key.mask, accumulate=True, varlen=varlen,
                local=key.stream == LOCAL, stream=max(key.stream, 0), final=key.occurrence == KEPT,
            ))
        planned.append(PlannedStep(step, tuple(step_blocks)))
    return RankPlan(
        world, rank, tuple(q_sides), (None,), tuple(planned), writes_first=False, streams=streams.kv_streams(rank, device),
        unselected_rows=unselected_rows(table.selected, sharding.local_len, device),
        final_rows=slice(min(kept_starts), sharding.local_len) if kept_starts else None,
    )


def _add(blocks: dict, key: BlockKey, sequence: int, rows: tuple[int, int, int]) -> None:
    blocks.setdefault(key, {})[sequence] = rows


def _computed(q_used: list[int], host: tuple[tuple[int, int], ...]) -> tuple[int | None, int | None]:
    """A block's sequences up to the last it computes (VarlenRows.computed_sequences), and the q
    rows before the next one (its q side). The spread documents' chunks come first in a rank's
    rows, so a remote block's prefix leaves out the kept documents; (None, None) where it would
    leave out nothing."""
    computed = [slot for slot, used in enumerate(q_used) if used]
    sequences = computed[-1] + 1 if computed else len(q_used)
    return (None, None) if sequences == len(q_used) else (sequences, host[sequences][0])


def _direction(member: int, other: int) -> tuple[int, int]:
    """(stream, step) at which span member `member` reads member `other`'s KV."""
    if other == member:
        return LOCAL, 0
    return (FORWARD, member - other) if other < member else (BACKWARD, other - member)


def _reads(sharding: BalancedSharding, doc: int, member: int, other: int, band: Interval) -> list[tuple[BlockCall, int, int]]:
    """(call, q rows used, kv rows used) of each call by which span member `member` of `doc` reads
    member `other`'s chunks and computes something."""
    ranks, size = sharding.spans[doc][1], sharding.chunk_size(doc)
    q_chunks, kv_chunks = (member, 2 * ranks - 1 - member), (other, 2 * ranks - 1 - other)
    reads = []
    for call in chunk_pair_calls(q_chunks, kv_chunks, band, (size,)):
        q_used = sum(sharding.chunk_slots(doc, q_chunks[lane]) for lane in call.q_lanes)
        kv_used = sum(sharding.chunk_slots(doc, kv_chunks[lane]) for lane in call.kv_lanes)
        if q_used and kv_used:
            reads.append((call, q_used, kv_used))
    return reads


@dataclass(frozen=True, eq=False)
class SpanStreams:
    """The two streams of a balanced sharding under one mask, the same on every rank."""

    sharding: BalancedSharding
    steps: tuple[tuple[int, ...], tuple[int, ...]]
    """Per stream, the steps at which some rank reads it."""
    units: tuple[tuple[dict[int, tuple[int, int, int]], ...], ...]
    """units[stream][origin][doc]: (first stream row, first lane, lanes) of the document's lanes
    that origin's stream carries."""
    capacity: int
    held_rows: tuple[tuple[tuple[int, ...], ...], ...]
    """held_rows[stream][origin][i]: rows of origin's stream that the hop into steps[stream][i] carries."""

    @property
    def plan_steps(self) -> tuple[int, ...]:
        """Step 0 (the local blocks), then every step some stream is read at."""
        return (0, *sorted(set(self.steps[FORWARD]) | set(self.steps[BACKWARD])))

    def kv_row(self, stream: int, origin: int, doc: int, lane: int) -> int:
        """The row of origin's stream at which lane `lane` of `doc` starts."""
        row, first_lane, _ = self.units[stream][origin][doc]
        return row + (lane - first_lane) * self.sharding.chunk_size(doc)

    def own_rows(self, stream: int, rank: int) -> list[int]:
        """The local rows of `rank` that make its stream, in stream order."""
        rows = []
        for doc, (_, first_lane, lanes) in self.units[stream][rank].items():
            size = self.sharding.chunk_size(doc)
            begin = self.sharding.starts[rank][doc] + first_lane * size
            rows += range(begin, begin + lanes * size)
        return rows

    def received_rows(self, rank: int) -> int:
        """KV rows that `rank` receives in one pass, over both streams."""
        world = self.sharding.world_size
        return sum(
            self.held_rows[stream][(rank - direction * step) % world][position]
            for stream, direction in enumerate(DIRECTIONS)
            for position, step in enumerate(self.steps[stream])
        )

    def received_dkv_rows(self, rank: int) -> int:
        """dK/dV rows that `rank` receives in one backward: the chains' buffers for its later
        steps (each as long as that step's KV), and its own chains coming home, each row once."""
        world, total = self.sharding.world_size, 0
        for stream, direction in enumerate(DIRECTIONS):
            steps, held = self.steps[stream], self.held_rows[stream]
            total += sum(held[(rank - direction * steps[position]) % world][position] for position in range(2, len(steps)))
            total += sum(held[rank][chain] for chain in range(min(2, len(steps))))
        return total

    def kv_streams(self, rank: int, device: torch.device) -> tuple[KVStream, ...]:
        streams = []
        for stream, direction in enumerate(DIRECTIONS):
            own = torch.tensor(self.own_rows(stream, rank), dtype=torch.long)
            positions = torch.full((self.sharding.local_len,), -1, dtype=torch.int32)
            positions[own] = torch.arange(len(own), dtype=torch.int32)
            streams.append(KVStream(
                direction, self.steps[stream], self.capacity, own_rows=own.to(device), own_positions=positions.to(device),
                held_rows=self.held_rows[stream],
            ))
        return tuple(streams)


@functools.lru_cache(maxsize=64)
def span_streams(sharding: BalancedSharding, band: Interval) -> SpanStreams:
    """Which lanes of which documents each rank's streams carry, in the order they leave them."""
    world = sharding.world_size
    # per stream, per origin rank: doc -> [first lane, last lane, last step that reads it]
    reads: list[list[dict[int, list[int]]]] = [[{} for _ in range(world)] for _ in DIRECTIONS]
    steps: list[set[int]] = [set() for _ in DIRECTIONS]
    for doc, (first, ranks) in enumerate(sharding.spans):
        for member in range(ranks if ranks > 1 else 0):
            for other in range(ranks):
                lanes = [lane for call, _, _ in _reads(sharding, doc, member, other, band) for lane in call.kv_lanes]
                stream, step = _direction(member, other)
                if stream == LOCAL or not lanes:
                    continue
                steps[stream].add(step)
                entry = reads[stream][(first + other) % world].setdefault(doc, [min(lanes), max(lanes), step])
                entry[:] = [min(entry[0], *lanes), max(entry[1], *lanes), max(entry[2], step)]
    units: list[list[dict[int, tuple[int, int, int]]]] = [[{} for _ in range(world)] for _ in DIRECTIONS]
    ends: list[list[list[tuple[int, int]]]] = [[[] for _ in range(world)] for _ in DIRECTIONS]  # (last step, end row) in stream order
    for stream in range(len(DIRECTIONS)):
        for origin in range(world):
            row = 0
            for doc, (first_lane, last_lane, last_step) in sorted(reads[stream][origin].items(), key=lambda item: (-item[1][2], item[0])):
                lanes = last_lane - first_lane + 1
                units[stream][origin][doc] = (row, first_lane, lanes)
                row += lanes * sharding.chunk_size(doc)
                ends[stream][origin].append((last_step, row))
    capacity = max((origin_ends[-1][1] for per_stream in ends for origin_ends in per_stream if origin_ends), default=0)
    held_rows = tuple(
        tuple(
            tuple(_hop_rows(ends[stream][origin], step) for step in sorted(steps[stream]))
            for origin in range(world)
        )
        for stream in range(len(DIRECTIONS))
    )
    frozen_units = tuple(tuple(per_stream) for per_stream in units)
    return SpanStreams(sharding, tuple(tuple(sorted(s)) for s in steps), frozen_units, capacity, held_rows)


def _hop_rows(ends: list[tuple[int, int]], step: int) -> int:
    """Rows that the hop into `step` carries: the units still read at `step` or later (a prefix:
    units go by last step, latest first)."""
    return max((end for last_step, end in ends if last_step >= step), default=0)


class _SpanRowsTable:
    """The blocks' VarlenRows; the q rows of each run of lanes are one cu_seqlens_q tensor."""

    def __init__(self, sharding: BalancedSharding, rank: int, device: torch.device):
        self.sharding, self.rank, self.device = sharding, rank, device
        self.layouts: dict[range, tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...], list[int]]] = {}
        self.selected: list[tuple[int, int]] = []
        """(start, stop) of the local q rows of every sequence some block selects."""

    def _layout(self, lanes: range) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...], list[int]]:
        """(cu_seqlens_q, seqused_q_all, the two on the host as (first row, rows) per sequence,
        each local sequence's index in them) of a run of lanes.
        Both lanes: every document is one sequence. One lane: the lane, then the rows up to the
        next document's lane as a sequence that no block computes."""
        if lanes not in self.layouts:
            sharding, bounds, used, index = self.sharding, [], [], []
            for doc, span_index, start in sharding.rank_rows[self.rank]:
                ranks, size = sharding.spans[doc][1], sharding.chunk_size(doc)
                chunks = (0,) if ranks == 1 else (span_index, 2 * ranks - 1 - span_index)
                if lanes == BOTH:
                    index.append(len(bounds))
                    bounds.append(start)
                    used.append(sum(sharding.chunk_slots(doc, chunk) for chunk in chunks))
                    continue
                first, last = (start, start) if ranks == 1 else (start + lanes.start * size, start + lanes.stop * size)
                index.append(len(bounds))
                bounds += [first, last]
                used += [sum(sharding.chunk_slots(doc, chunks[lane]) for lane in lanes) if ranks > 1 else 0, 0]
            cu = torch.tensor([*bounds, sharding.local_len], dtype=torch.int32).to(self.device)
            self.layouts[lanes] = (cu, torch.tensor(used, dtype=torch.int32).to(self.device), tuple(zip(bounds, used)), index)
        return self.layouts[lanes]

    def rows(self, lanes: range, sequences: dict[int, tuple[int, int, int]], end: int, kv_shift: int) -> tuple[VarlenRows, int | None]:
        """A block over the run `lanes` of the local sequences in `sequences` (the others select
        no rows), against KV of `end` rows; and the q rows its computed sequences end before
        (None: all of them)."""
        cu_q, used_all, host, index = self._layout(lanes)
        slots = len(host)
        q_used, kv_first, kv_used = [0] * slots, [], [0] * slots
        by_slot = {index[sequence]: rows for sequence, rows in sequences.items()}
        if any(rows[0] != host[slot][1] for slot, rows in by_slot.items()):
            raise AssertionError("a block selects part of a run of lanes: it cannot share the run's rows")
        self.selected += [(host[slot][0], host[slot][0] + rows[0]) for slot, rows in by_slot.items()]
        previous = 0
        for slot in range(slots):
            if slot in by_slot:
                q_used[slot], previous, kv_used[slot] = by_slot[slot]
            kv_first.append(previous)  # unused entries repeat the last start: cu_seqlens stays monotone
        packed = torch.tensor([q_used, kv_used, [*kv_first]], dtype=torch.int32).to(self.device)
        cu_k = torch.cat([packed[2], packed.new_tensor([end])])
        computed, rows = _computed(q_used, host)
        return VarlenRows(cu_q, cu_k, packed[0], packed[1], seqused_q_all=used_all, kv_shift=kv_shift, computed_sequences=computed), rows
