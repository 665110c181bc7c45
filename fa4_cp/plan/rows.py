"""One rank's plan of a ring call: its steps, and each block call's rows, ready for the loop.

Everything one rank needs for a whole ring is decided here, once per call signature (cached):
the active steps and the hop to the next one, each block's mask and whether it overwrites the
accumulators, and the block's rows. Rows are "sides": a q side is a run of q lanes, a kv side a
run of kv lanes, so the executor slices each tensor once per call, not once per step. Dense
sides are row slices (None: every row). Packed documents have planners of their own that fill
the same RankPlan, their blocks selecting rows through FA4-style cu_seqlens/seqused tensors:
document_rows.py (every document cut over all ranks) and span_rows.py (the balanced layout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels.interface import BandMask, VarlenRows
from .schedule import build_schedule
from .sharding import Sharding


@dataclass(frozen=True)
class PlannedBlock:
    q_side: int
    """Index into RankPlan.q_sides."""
    kv_side: int
    """Index into RankPlan.kv_sides."""
    mask: BandMask
    accumulate: bool
    """False for a first call that overwrites the forward's accumulators."""
    varlen: VarlenRows | None
    local: bool = False
    """Against the rank's own K and V (every row), not the travelling copy."""


@dataclass(frozen=True)
class PlannedStep:
    step: int
    blocks: tuple[PlannedBlock, ...]
    next_offset: int
    """The hop to the next active step; 0 after the last one."""


@dataclass(frozen=True, eq=False)
class RankPlan:
    world_size: int
    rank: int
    q_sides: tuple[slice | None, ...]
    kv_sides: tuple[slice | None, ...]
    steps: tuple[PlannedStep, ...]
    writes_first: bool
    """The first block overwrites the forward's accumulators, which may start unfilled."""
    travel_len: int | None = None
    """This rank's local rows that travel, from the first; None: every row."""
    buffer_len: int | None = None
    """Rows of the travelling buffers, the same on every rank; None: every local row."""
    local_first_step: bool = False
    """On every rank, the first step is step 0 and all its blocks are local: nothing travels there."""

    @functools.cached_property
    def has_local_blocks(self) -> bool:
        return any(block.local for step in self.steps for block in step.blocks)

    @property
    def first_offset(self) -> int:
        """The hop from the local KV to the first active step."""
        return self.steps[0].step if self.steps else 0

    @property
    def home_offset(self) -> int:
        """The hop that brings what is held at the last active step back to its owner."""
        return -self.steps[-1].step % self.world_size if self.steps else 0


@functools.lru_cache(maxsize=256)
def rank_plan(sharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    """The plan of `rank` (cached: a training run calls the same signature every layer)."""
    if not isinstance(sharding, Sharding):
        from .span_rows import span_plan

        return span_plan(sharding, mask, rank, device)
    if sharding.varlen:
        from .document_rows import document_plan

        return document_plan(sharding, mask, rank, device)
    schedule = build_schedule(sharding, mask)
    q_sides: dict[range, int] = {}
    kv_sides: dict[range, int] = {}
    planned = []
    first = True
    for index, (step, calls) in enumerate(zip(schedule.steps, schedule.calls[rank])):
        blocks = []
        for call in calls:
            blocks.append(
                PlannedBlock(
                    q_side=q_sides.setdefault(call.q_lanes, len(q_sides)),
                    kv_side=kv_sides.setdefault(call.kv_lanes, len(kv_sides)),
                    mask=call.mask,
                    accumulate=not (first and schedule.writes_first[rank]),
                    varlen=None,
                )
            )
            first = False
        following = schedule.steps[index + 1] - step if index + 1 < len(schedule.steps) else 0
        planned.append(PlannedStep(step, tuple(blocks), following))
    return RankPlan(
        sharding.world_size,
        rank,
        tuple(_dense_rows(sharding, lanes) for lanes in q_sides),
        tuple(_dense_rows(sharding, lanes) for lanes in kv_sides),
        tuple(planned),
        schedule.writes_first[rank],
    )


def _dense_rows(sharding: Sharding, lanes: range) -> slice | None:
    """The rows of a run of lanes; None for every row."""
    if lanes == range(sharding.lanes):
        return None
    return sharding.lane_slice(lanes)
