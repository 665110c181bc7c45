"""One rank's plan for the balanced document layout (placement.py): every document's span is its
own small zigzag ring, and each ring step gathers the sequences of all documents that meet there
into a few varlen blocks.

At ring step s rank r holds the travelling chunks of rank r - s. For a document spread over g
ranks, the pair (r, r - s), both in its span, is the pair (i, j) of the span's zigzag; the calls
between their lanes come from the generic chunk-pair planner (schedule.py), so every mask that
the dense ring takes works here too. A kept document meets only itself, at step 0. At step 0
every block reads the rank's own K and V (a local block; the travelling copy is the same rows).
Active steps: 0, and 1..G-1 and W-G+1..W-1 for the widest span G (the same on every rank); the
others are skipped with their transfer.

Blocks share their q rows: a block lists every local sequence (its documents, in local order),
those it does not compute with no rows, so that all blocks whose q rows start at a document's
first lane use one cu_seqlens_q tensor, and those starting at its second lane another. A backend
then keeps one dq accumulator per tensor, not one per block.
"""

from __future__ import annotations

import torch

from ..kernels.interface import BandMask, VarlenRows
from .placement import BalancedSharding
from .rows import PlannedBlock, PlannedStep, RankPlan
from .schedule import band_interval, chunk_pair_calls

Key = tuple[int, BandMask, int, int]  # step, mask, first q lane, occurrence


def span_plan(sharding: BalancedSharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    world, band = sharding.world_size, band_interval(mask)
    local = sharding.rank_rows[rank]
    q_starts = [[start for _, _, start in local], [start + (sharding.chunk_size(doc) if sharding.spans[doc][1] > 1 else 0) for doc, _, start in local]]
    blocks: dict[Key, dict[int, tuple[int, int, int]]] = {}  # key -> local sequence -> (q used, kv first row, kv used)
    for sequence, (doc, index, start) in enumerate(local):
        first, ranks = sharding.spans[doc]
        if ranks == 1:
            _add(blocks, (0, mask, 0, 0), sequence, (sharding.doc_lengths[doc], start, sharding.doc_lengths[doc]))
            continue
        size, q_chunks = sharding.chunk_size(doc), (index, 2 * ranks - 1 - index)
        for other in range(ranks):
            source, kv_chunks = (first + other) % world, (other, 2 * ranks - 1 - other)
            step, seen = (rank - source) % world, {}
            for call in chunk_pair_calls(q_chunks, kv_chunks, band, (size,)):
                q_used = sum(sharding.valid_slots(doc, q_chunks[lane]) for lane in call.q_lanes)
                kv_used = sum(sharding.valid_slots(doc, kv_chunks[lane]) for lane in call.kv_lanes)
                if not (q_used and kv_used):
                    continue
                occurrence = seen.setdefault((call.mask, call.q_lanes.start), 0)
                seen[(call.mask, call.q_lanes.start)] += 1  # a second call of the same kind: rows of its own
                kv_first = sharding.starts[source][doc] + call.kv_lanes.start * size
                _add(blocks, (step, call.mask, call.q_lanes.start, occurrence), sequence, (q_used, kv_first, kv_used))
    widest = max((ranks for _, ranks in sharding.spans if ranks > 1), default=0)
    steps = sorted({0, *range(1, widest), *range(world - widest + 1, world)})
    table = _RowsTable(device, q_starts, sharding.local_len, sharding.buffer_len)
    planned = []
    for index, step in enumerate(steps):
        keys = sorted((key for key in blocks if key[0] == step), key=lambda key: (str(key[1]), key[2], key[3]))
        step_blocks = tuple(
            PlannedBlock(0, 0, key[1], accumulate=True, varlen=table.rows(key[2], blocks[key], len(local), step == 0), local=step == 0)
            for key in keys
        )
        planned.append(PlannedStep(step, step_blocks, steps[index + 1] - step if index + 1 < len(steps) else 0))
    return RankPlan(
        world, rank, (None,), (None,), tuple(planned), writes_first=False,
        travel_len=sharding.travel_len(rank), buffer_len=sharding.buffer_len,
    )


def _add(blocks: dict, key: Key, sequence: int, rows: tuple[int, int, int]) -> None:
    blocks.setdefault(key, {})[sequence] = rows


class _RowsTable:
    """The blocks' VarlenRows; the two q layouts' cu_seqlens are one tensor each."""

    def __init__(self, device: torch.device, q_starts: list[list[int]], q_rows: int, kv_rows: int):
        self.device, self.q_rows, self.kv_rows = device, q_rows, kv_rows
        self.cu_q = [torch.tensor([*starts, q_rows], dtype=torch.int32).to(device) for starts in q_starts]

    def rows(self, lane: int, sequences: dict[int, tuple[int, int, int]], count: int, local: bool) -> VarlenRows:
        """A block over `count` local sequences; those not in `sequences` select no rows."""
        q_used, kv_first, kv_used = [0] * count, [], [0] * count
        previous = 0
        for sequence in range(count):
            if sequence in sequences:
                q_used[sequence], previous, kv_used[sequence] = sequences[sequence]
            kv_first.append(previous)  # unused entries repeat the last start: cu_seqlens stays monotone
        end = self.q_rows if local else self.kv_rows
        packed = torch.tensor([q_used, kv_used, kv_first], dtype=torch.int32).to(self.device)
        cu_k = torch.cat([packed[2], packed.new_tensor([end])])
        return VarlenRows(self.cu_q[lane], cu_k, packed[0], packed[1])
