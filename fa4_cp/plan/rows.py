"""One rank's plan of a ring call: its steps, and each block call's rows, ready for the loop.

Everything one rank needs for a whole ring is decided here, once per call signature (cached):
the active steps and the hop to the next one, each block's mask and whether it overwrites the
accumulators, and the block's rows. Rows are "sides": a q side is a run of q lanes, a kv side a
run of kv lanes, so the executor slices each tensor once per call, not once per step. Dense
sides are row slices (None: every row). Packed documents have planners of their own that fill
the same RankPlan, their blocks selecting rows through FA4-style cu_seqlens/seqused tensors.
Each sharding kind plans through its own planner: dense_rows.py (a dense sequence),
document_rows.py (every document cut over all ranks) and span_rows.py (the balanced layout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels.interface import BandMask, VarlenRows


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
    """The plan of `rank` under any sharding that plans (cached: a training run calls the same
    signature every layer)."""
    return sharding.rank_plan(mask, rank, device)
