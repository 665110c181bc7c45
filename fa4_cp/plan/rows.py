"""One rank's plan of a ring call: its steps, and each block call's rows, ready for the loop.

Everything one rank needs for a whole ring is decided here, once per call signature (cached):
the active steps and the KV streams that travel between them, each block's mask and whether it overwrites the
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
    stream: int = 0
    """Index into RankPlan.streams: which travelling KV the block reads (unless local)."""
    final: bool = False
    """Local, and the only block of every row it selects (RankPlan.final_rows): the forward may
    write those rows finished, in q's dtype."""


@dataclass(frozen=True)
class PlannedStep:
    step: int
    blocks: tuple[PlannedBlock, ...]


@dataclass(frozen=True, eq=False)
class KVStream:
    """KV that moves one way round the ring, read at `steps`: at step s a rank holds the stream of
    rank - s (direction +1) or rank + s (direction -1). Between two of its steps it hops straight
    from one holder to the next, so steps where nothing is read move nothing.

    By default a stream is the rank's whole K and V, every hop carrying all of it. A planner that
    knows which rows each step reads gives `own_rows` and `held_rows`: a rank puts only the rows
    some peer reads into its stream, ordered by the last step that reads them, so that each hop
    carries a prefix that shrinks as the stream goes."""

    direction: int
    steps: tuple[int, ...]
    """Ring steps at which the stream is read, increasing; the same on every rank."""
    capacity: int | None = None
    """Rows of the stream's buffers, the same on every rank; None: k's rows."""
    own_rows: torch.Tensor | None = None
    """The rank's local rows that make its stream, in stream order (int64, on the plan's device);
    None: every local row, in order."""
    own_positions: torch.Tensor | None = None
    """With `own_rows`: each local row's row in the stream, -1 where it is not in it (int32)."""
    held_rows: tuple[tuple[int, ...], ...] | None = None
    """held_rows[origin][i]: the first rows of rank origin's stream that the hop into steps[i]
    carries (all that steps[i] and later read); None: the whole buffer."""

    def origin(self, rank: int, world_size: int, position: int) -> int:
        """Whose stream `rank` holds at steps[position] (its own at position -1)."""
        return rank if position < 0 else (rank - self.direction * self.steps[position]) % world_size

    def rows(self, origin: int, position: int) -> int | None:
        """Rows of origin's stream held at steps[position]; None: the whole buffer."""
        return None if self.held_rows is None else self.held_rows[origin][position]


def ring_stream(steps: tuple[int, ...]) -> tuple[KVStream, ...]:
    """The plain ring's one stream: every row of K and V, read at every active step."""
    return (KVStream(1, steps),)


@dataclass(frozen=True, eq=False)
class RankPlan:
    world_size: int
    rank: int
    q_sides: tuple[slice | None, ...]
    kv_sides: tuple[slice | None, ...]
    steps: tuple[PlannedStep, ...]
    writes_first: bool
    """The first block overwrites the forward's accumulators, which may start unfilled."""
    streams: tuple[KVStream, ...]
    """What travels; blocks name theirs (PlannedBlock.stream)."""
    unselected_rows: torch.Tensor | None = None
    """Without `writes_first`: the local q rows that no block selects (int64, on the plan's
    device), the only rows of the forward's out accumulator to zero (a block writes a row whose
    lse is still -inf without reading its out). None: every row."""
    final_rows: slice | None = None
    """The trailing local rows that only the `final` block selects (or none: padding); None
    where no block is final."""

    @functools.cached_property
    def has_local_blocks(self) -> bool:
        return any(block.local for step in self.steps for block in step.blocks)

    @functools.cached_property
    def sole_block(self) -> PlannedBlock | None:
        """The plan's only block, where it is dense, at step 0 (the rank's own K and V) and over
        every kv row: it is then every row's only contributor, forward and backward."""
        if len(self.steps) != 1 or len(self.steps[0].blocks) != 1 or self.steps[0].step % self.world_size:
            return None
        block = self.steps[0].blocks[0]
        return block if block.varlen is None and self.kv_sides[block.kv_side] is None else None


def unselected_rows(selected: list[tuple[int, int]], rows: int, device: torch.device) -> torch.Tensor:
    """The rows of [0, rows) outside every (start, stop) run of `selected`, as an index on `device`."""
    outside = torch.ones(rows, dtype=torch.bool)
    for start, stop in selected:
        outside[start:stop] = False
    return outside.nonzero().flatten().to(device)


@functools.lru_cache(maxsize=256)
def rank_plan(sharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    """The plan of `rank` under any sharding that plans (cached: a training run calls the same
    signature every layer)."""
    return sharding.rank_plan(mask, rank, device)
