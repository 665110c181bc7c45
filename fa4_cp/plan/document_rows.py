"""One rank's plan for packed documents cut over every rank (the "zigzag" and "contiguous"
document layouts): the ring schedule's calls, each taking the rows of its lanes in every document.

One schedule serves all documents when one band per call computes the mask for every chunk size
(any mask without a window). A sliding window is in tokens, so the offset it cuts between two
chunks differs with the chunk size: the documents are then grouped by chunk size, and each group
follows the schedule of its own size; the steps are the union of theirs.

A masked block's documents all have as many more keys than queries (`VarlenRows.kv_shift`), so a
call is split by that difference, which padding makes differ. Blocks over one run of q lanes
share its cu_seqlens_q tensor and take each document whole or not at all: a backend keeps one dq
accumulator per run (`VarlenRows.seqused_q_all`). Every tensor is built on the host and copied to
the device in one go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..kernels.interface import BandMask, VarlenRows
from .rows import PlannedBlock, PlannedStep, RankPlan, ring_stream, unselected_rows
from .schedule import BlockCall, RingSchedule, build_schedule

if TYPE_CHECKING:
    from .chunked_sharding import ChunkedSharding


def document_plan(sharding: ChunkedSharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    groups = _schedules(sharding, mask)
    steps = sorted({step for _, schedule in groups for step in schedule.steps})
    rows = _LaneRowsTable(sharding, rank)
    pending: list[list[PendingBlock]] = []  # per step
    for step in steps:
        blocks = []
        for size, schedule in groups:
            if step not in schedule.steps:
                continue
            source = schedule.source_rank(rank, step)
            for call in schedule.calls[rank][schedule.steps.index(step)]:
                blocks += _split(rows, call, source, size)
        pending.append(blocks)
    table = rows.to_device(device)
    planned = []
    for step, blocks in zip(steps, pending):
        step_blocks = tuple(
            PlannedBlock(
                0, 0, block.mask, accumulate=True,
                varlen=table.block(block.q_side, block.kv_side, block.q_used, block.kv_used, block.kv_shift),
            )
            for block in blocks
        )
        planned.append(PlannedStep(step, step_blocks))
    return RankPlan(
        sharding.world_size, rank, (None,), (None,), tuple(planned), writes_first=False, streams=ring_stream(tuple(steps)),
        unselected_rows=unselected_rows(rows.selected, sharding.local_len, device),
    )


def _schedules(sharding: ChunkedSharding, mask: BandMask) -> list[tuple[int | None, RingSchedule]]:
    """(chunk size, its schedule) per group of documents; one group (None) when one band per call
    serves every size."""
    try:
        return [(None, build_schedule(sharding, mask))]
    except ValueError:  # the chunk offsets differ between sizes: one schedule per size
        sizes = sorted({size for size in sharding.chunk_sizes if size > 0})
        return [(size, build_schedule(sharding, mask, (size,))) for size in sizes]


class PendingBlock(NamedTuple):
    """A block before its tensors exist: entries of the rows table (sides: (cu_seqlens, seqused))."""

    mask: BandMask
    q_side: tuple[int, int]
    kv_side: tuple[int, int]
    q_used: int
    kv_used: int
    kv_shift: int


def _split(rows: _LaneRowsTable, call: BlockCall, source: int, size: int | None) -> list[PendingBlock]:
    """The blocks of one call: its documents (of chunk size `size`, or all), split by kv shift
    when the call is masked."""
    q_side, q_starts, q_used = rows.side(rows.rank, call.q_lanes)
    kv_side, _, kv_used = rows.side(source, call.kv_lanes)
    by_shift: dict[int, list[int]] = {}
    for doc, (nq, nk) in enumerate(zip(q_used, kv_used)):
        if nq and nk and (size is None or rows.sharding.chunk_sizes[doc] == size):
            by_shift.setdefault(0 if call.mask.is_full else nk - nq, []).append(doc)
    blocks = []
    for shift, docs in sorted(by_shift.items()):
        chosen = set(docs)
        rows.selected += [(q_starts[doc], q_starts[doc] + q_used[doc]) for doc in docs]
        pick = lambda used: [n if doc in chosen else 0 for doc, n in enumerate(used)]  # noqa: E731 - two uses, one line
        blocks.append(PendingBlock(call.mask, q_side, kv_side, rows.used(pick(q_used)), rows.used(pick(kv_used)), shift))
    return blocks


class _LaneRowsTable:
    """Host rows of the plan's sides (cu_seqlens and seqused of a rank's run of lanes) and of its
    blocks' seqused, then one device tensor. Each side has tensors of its own, so that a backend
    keying per-side state on the cu_seqlens_q tensor never mixes two runs that start alike."""

    def __init__(self, sharding: ChunkedSharding, rank: int):
        self.sharding, self.rank = sharding, rank
        self.index: dict[tuple, int] = {}
        self.entries: list[list[int]] = []
        self.selected: list[tuple[int, int]] = []
        """(start, stop) of the local q rows of every document some block selects."""

    def _entry(self, key: tuple, values: list[int]) -> int:
        if key not in self.index:
            self.index[key] = len(self.entries)
            self.entries.append(values)
        return self.index[key]

    def side(self, rank: int, lanes: range) -> tuple[tuple[int, int], list[int], list[int]]:
        """((cu_seqlens entry, seqused entry), host cu_seqlens, host seqused) of a rank's run of lanes."""
        cu, used = self.sharding.lane_rows(rank, lanes)
        key = (rank, lanes.start, lanes.stop)
        return (self._entry(("cu", *key), cu), self._entry(("used", *key), used)), cu, used

    def used(self, used: list[int]) -> int:
        """The entry of a block's seqused (blocks with equal ones share it)."""
        return self._entry(("block", *used), used)

    def to_device(self, device: torch.device) -> _DeviceRows:
        return _DeviceRows(self.entries, device)


class _DeviceRows:
    def __init__(self, entries: list[list[int]], device: torch.device):
        width = max((len(entry) for entry in entries), default=0)
        padded = [entry + [0] * (width - len(entry)) for entry in entries]
        self.table = torch.tensor(padded, dtype=torch.int32).to(device) if entries else None
        self.lengths = [len(entry) for entry in entries]

    def row(self, entry: int) -> torch.Tensor:
        return self.table[entry, : self.lengths[entry]]

    def block(self, q_side: tuple[int, int], kv_side: tuple[int, int], q_used: int, kv_used: int, shift: int) -> VarlenRows:
        return VarlenRows(
            self.row(q_side[0]), self.row(kv_side[0]), self.row(q_used), self.row(kv_used),
            seqused_q_all=self.row(q_side[1]), kv_shift=shift,
        )
