"""One rank's plan for the balanced document layout (placement.py): every document's span is its
own small zigzag ring, and each ring step gathers the sequences of all documents that meet there
into a few varlen blocks.

At ring step s rank r holds the travelling chunks of rank r - s. For a document spread over g
ranks, the pair (r, r - s), both in its span, is the pair (i, j) of the span's zigzag; the calls
between their lanes come from the generic chunk-pair planner (schedule.py), so every mask that
the dense ring takes works here too. A kept document meets only itself, at step 0. At step 0
every block reads the rank's own K and V (a local block; the travelling copy is the same rows).
Active steps: 0, and every step at which some document's span pair sees anything (the same on
every rank: 1..G-1 and W-G+1..W-1 for the widest span G, fewer under a sliding window); the
others are skipped with their transfer.

Blocks share their q rows: all blocks whose calls take the same run of a document's lanes (both
lanes, or the second, or the first) use one cu_seqlens_q tensor, which lists that run of every
local document (and, between runs, the rows in between as sequences no block computes). A block
selects each sequence whole or not at all, so a backend keeps one dq accumulator per tensor
(`VarlenRows.seqused_q_all`), not one per block. A masked block's sequences all have as many
more keys than queries (`VarlenRows.kv_shift`): a call's documents are split by that difference.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..kernels.interface import BandMask, VarlenRows
from .rows import PlannedBlock, PlannedStep, RankPlan
from .schedule import Interval, band_interval, chunk_pair_calls

if TYPE_CHECKING:
    from .placement import BalancedSharding



class BlockKey(NamedTuple):
    """What makes calls one block: the same step, mask, run of q lanes, kv shift, and the same
    occurrence of that kind (a second call of a kind is a block of its own)."""

    step: int
    mask: BandMask
    q_lanes: range
    occurrence: int
    kv_shift: int


BOTH = range(0, 2)


def span_plan(sharding: BalancedSharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    world, band = sharding.world_size, band_interval(mask)
    local = sharding.rank_rows[rank]
    blocks: dict[BlockKey, dict[int, tuple[int, int, int]]] = {}  # key -> local sequence -> (q used, kv first row, kv used)
    for sequence, (doc, index, start) in enumerate(local):
        first, ranks = sharding.spans[doc]
        if ranks == 1:
            _add(blocks, BlockKey(0, mask, BOTH, 0, 0), sequence, (sharding.doc_lengths[doc], start, sharding.doc_lengths[doc]))
            continue
        size, q_chunks = sharding.chunk_size(doc), (index, 2 * ranks - 1 - index)
        for other in range(ranks):
            source, kv_chunks = (first + other) % world, (other, 2 * ranks - 1 - other)
            step, seen = (rank - source) % world, {}
            for call in chunk_pair_calls(q_chunks, kv_chunks, band, (size,)):
                q_used = sum(sharding.chunk_slots(doc, q_chunks[lane]) for lane in call.q_lanes)
                kv_used = sum(sharding.chunk_slots(doc, kv_chunks[lane]) for lane in call.kv_lanes)
                if not (q_used and kv_used):
                    continue
                occurrence = seen.setdefault((call.mask, call.q_lanes), 0)
                seen[(call.mask, call.q_lanes)] += 1  # a second call of the same kind: a block of its own
                kv_first = sharding.starts[source][doc] + call.kv_lanes.start * size
                shift = 0 if call.mask.is_full else kv_used - q_used
                _add(blocks, BlockKey(step, call.mask, call.q_lanes, occurrence, shift), sequence, (q_used, kv_first, kv_used))
    steps = active_steps(sharding, band)
    table = _SpanRowsTable(sharding, rank, device)
    planned = []
    for index, step in enumerate(steps):
        keys = sorted(
            (key for key in blocks if key.step == step),
            key=lambda key: (str(key.mask), key.q_lanes.start, key.q_lanes.stop, key.occurrence, key.kv_shift),
        )
        step_blocks = tuple(
            PlannedBlock(0, 0, key.mask, accumulate=True, varlen=table.rows(key.q_lanes, blocks[key], step == 0, key.kv_shift), local=step == 0)
            for key in keys
        )
        planned.append(PlannedStep(step, step_blocks, steps[index + 1] - step if index + 1 < len(steps) else 0))
    return RankPlan(
        world, rank, (None,), (None,), tuple(planned), writes_first=False,
        travel_len=sharding.travel_len(rank), buffer_len=sharding.buffer_len, local_first_step=True,
    )


def _add(blocks: dict, key: BlockKey, sequence: int, rows: tuple[int, int, int]) -> None:
    blocks.setdefault(key, {})[sequence] = rows


@functools.lru_cache(maxsize=64)
def active_steps(sharding: BalancedSharding, band: Interval) -> tuple[int, ...]:
    """Ring steps at which some rank computes: 0, and the steps between the two ranks of a span
    pair whose valid chunks hold a (query, key) pair with j - i inside the band. The same on
    every rank: it reads only the sharding."""
    world, steps = sharding.world_size, {0}
    for doc, (_, ranks) in enumerate(sharding.spans):
        if ranks < 2:
            continue
        chunks = [_valid_positions(sharding, doc, chunk) for chunk in range(2 * ranks)]
        for i in range(ranks):
            for j in range(ranks):
                step = (i - j) % world
                if step in steps:
                    continue
                q_sides = (chunks[i], chunks[2 * ranks - 1 - i])
                kv_sides = (chunks[j], chunks[2 * ranks - 1 - j])
                if any(_sees(q, kv, band) for q in q_sides for kv in kv_sides):
                    steps.add(step)
    return tuple(sorted(steps))


def _valid_positions(sharding: BalancedSharding, doc: int, chunk: int) -> tuple[int, int] | None:
    """First and last document position of a chunk's valid slots; None if it holds none."""
    valid = sharding.chunk_slots(doc, chunk)
    first = chunk * sharding.chunk_size(doc)
    return (first, first + valid - 1) if valid else None


def _sees(q: tuple[int, int] | None, kv: tuple[int, int] | None, band: Interval) -> bool:
    """Whether some key position of `kv` minus some query position of `q` lies in the band."""
    if q is None or kv is None:
        return False
    return max(kv[0] - q[1], band[0]) <= min(kv[1] - q[0], band[1])


class _SpanRowsTable:
    """The blocks' VarlenRows; the q rows of each run of lanes are one cu_seqlens_q tensor."""

    def __init__(self, sharding: BalancedSharding, rank: int, device: torch.device):
        self.sharding, self.rank, self.device = sharding, rank, device
        self.layouts: dict[range, tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = {}

    def _layout(self, lanes: range) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """(cu_seqlens_q, seqused_q_all, the same on the host, each local sequence's index in them)
        of a run of lanes.
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
            self.layouts[lanes] = (cu, torch.tensor(used, dtype=torch.int32).to(self.device), used, index)
        return self.layouts[lanes]

    def rows(self, lanes: range, sequences: dict[int, tuple[int, int, int]], local: bool, kv_shift: int) -> VarlenRows:
        """A block over the run `lanes` of the local sequences in `sequences` (the others select
        no rows)."""
        cu_q, used_all, used_host, index = self._layout(lanes)
        slots = len(used_host)
        q_used, kv_first, kv_used = [0] * slots, [], [0] * slots
        by_slot = {index[sequence]: rows for sequence, rows in sequences.items()}
        if any(rows[0] != used_host[slot] for slot, rows in by_slot.items()):
            raise AssertionError("a block selects part of a run of lanes: it cannot share the run's rows")
        previous = 0
        for slot in range(slots):
            if slot in by_slot:
                q_used[slot], previous, kv_used[slot] = by_slot[slot]
            kv_first.append(previous)  # unused entries repeat the last start: cu_seqlens stays monotone
        end = self.sharding.local_len if local else self.sharding.buffer_len
        packed = torch.tensor([q_used, kv_used, [*kv_first]], dtype=torch.int32).to(self.device)
        cu_k = torch.cat([packed[2], packed.new_tensor([end])])
        return VarlenRows(cu_q, cu_k, packed[0], packed[1], seqused_q_all=used_all, kv_shift=kv_shift)
