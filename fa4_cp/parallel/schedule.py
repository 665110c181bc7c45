"""The ring schedule: at ring step s, rank r holds the KV of rank (r - s) mod W; which block pairs
does it compute, under which mask?

One schedule serves every layout and mask. A rank's rows are lanes (chunks) of `chunk_size`
slots; a pair of lanes (q lane a, kv lane b) sees, in global positions, the band of the global
mask shifted by the distance between the two chunks. The schedule covers the non-empty lane
pairs of a step with the fewest rectangles (a run of q lanes x a run of kv lanes) that one
`BandMask` in the rectangle's local coordinates computes exactly: each visible (query, key)
pair once, no other. For varlen documents the mask must be the same for every chunk size.

Transfers: a ring step at which no rank computes anything moves no data. The executor jumps KV
straight from the last active step to the next one (a hop of several ranks), so fully masked
hops, e.g. far outside a sliding window, cost neither compute nor transfer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..kernels.interface import BandMask
from .sharding import Sharding

Interval = tuple[float, float]  # closed integer interval of key offsets j - i; empty when lo > hi


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: q rows of a run of lanes against kv rows of a run of lanes."""

    q_lanes: range
    kv_lanes: range
    mask: BandMask


@dataclass(frozen=True, eq=False)  # compared by identity: schedules are built once and cached
class RingSchedule:
    world_size: int
    steps: tuple[int, ...]
    """Active ring steps, increasing; every other step is skipped with its transfer."""
    calls: tuple[tuple[tuple[BlockCall, ...], ...], ...]
    """calls[rank][i]: what rank computes at steps[i]; a call covering every q row comes first."""

    def source_rank(self, rank: int, step: int) -> int:
        """Whose KV rank holds at ring step `step`."""
        return (rank - step) % self.world_size


def build_schedule(sharding: Sharding, mask: BandMask) -> RingSchedule:
    return _build_schedule(sharding, mask)


@functools.lru_cache(maxsize=64)
def _build_schedule(sharding: Sharding, mask: BandMask) -> RingSchedule:
    world = sharding.world_size
    sizes = sorted({size for size in sharding.chunk_sizes if size > 0}) or [1]
    band = (-math.inf if mask.lo is None else mask.lo, math.inf if mask.hi is None else mask.hi)
    per_rank = [
        [_plan_pair(sharding.chunks_of(rank), sharding.chunks_of((rank - step) % world), band, sizes) for step in range(world)]
        for rank in range(world)
    ]
    active = tuple(step for step in range(world) if any(per_rank[rank][step] for rank in range(world)))
    calls = tuple(tuple(per_rank[rank][step] for step in active) for rank in range(world))
    return RingSchedule(world, active, calls)


def _plan_pair(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], band: Interval, sizes: list[int]) -> tuple[BlockCall, ...]:
    pairs = _LanePairs(q_chunks, kv_chunks, band, sizes)
    needed = {cell for cell in _cells(range(len(q_chunks)), range(len(kv_chunks))) if pairs.is_visible(*cell)}
    if not needed:
        return ()
    options = [
        (rect, mask)
        for rect in _rectangles(len(q_chunks), len(kv_chunks))
        if any(cell in needed for cell in _cells(*rect))
        for mask in [pairs.rectangle_mask(*rect)]
        if mask is not None
    ]
    cover = _min_cover(needed, options)
    if cover is None:
        raise ValueError(
            f"mask {band} cannot be computed with one band per block for chunk sizes {sizes}: "
            "the chunk offsets differ between documents"
        )
    cover.sort(key=lambda option: (-len(option[0][0]), option[0][0].start, option[0][1].start))
    return tuple(BlockCall(q_lanes, kv_lanes, mask) for (q_lanes, kv_lanes), mask in cover)


class _LanePairs:
    """Visibility between the lanes of a q rank and a kv rank, for every chunk size at once.

    Inside a rectangle whose first lanes are (a0, b0), lane pair (a, b) spans the local key
    offsets `reach` and sees those in the global band shifted by `shift`.
    """

    def __init__(self, q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], band: Interval, sizes: list[int]):
        self.q_chunks, self.kv_chunks, self.band, self.sizes = q_chunks, kv_chunks, band, sizes

    def _geometry(self, a: int, b: int, a0: int, b0: int, size: int) -> tuple[Interval, int]:
        local_shift = ((b - b0) - (a - a0)) * size
        global_shift = (self.kv_chunks[b] - self.q_chunks[a]) * size
        return (local_shift - (size - 1), local_shift + (size - 1)), global_shift - local_shift

    def _visible(self, a: int, b: int, a0: int, b0: int, size: int) -> Interval:
        reach, shift = self._geometry(a, b, a0, b0, size)
        return _clip((self.band[0] - shift, self.band[1] - shift), reach)

    def is_visible(self, a: int, b: int) -> bool:
        return any(not _is_empty(self._visible(a, b, a, b, size)) for size in self.sizes)

    def rectangle_mask(self, q_lanes: range, kv_lanes: range) -> BandMask | None:
        """One band that computes exactly the visible pairs of the rectangle for every size, or None."""
        a0, b0 = q_lanes.start, kv_lanes.start
        candidates = {(-math.inf, math.inf)}
        for a, b in _cells(q_lanes, kv_lanes):
            _, shift = self._geometry(a, b, a0, b0, self.sizes[0])
            candidates.add((self.band[0] - shift, self.band[1] - shift))
        for candidate in sorted(candidates, key=lambda c: ((c[0] != -math.inf) + (c[1] != math.inf), c)):
            if all(
                _clip(candidate, self._geometry(a, b, a0, b0, size)[0]) == self._visible(a, b, a0, b0, size)
                for a, b in _cells(q_lanes, kv_lanes)
                for size in self.sizes
            ):
                return _normalized(candidate, len(q_lanes), len(kv_lanes), self.sizes[-1])
        return None


def _normalized(candidate: Interval, lanes_q: int, lanes_kv: int, size: int) -> BandMask:
    """Drop band edges that cut nothing in a rectangle of this many lanes of the largest size."""
    lo, hi = candidate
    return BandMask(
        lo=None if lo <= -(lanes_q * size - 1) else int(lo),
        hi=None if hi >= lanes_kv * size - 1 else int(hi),
    )


def _clip(interval: Interval, reach: Interval) -> Interval:
    """Intersection, with every empty interval written (1, 0) so that equality compares sets."""
    clipped = (max(interval[0], reach[0]), min(interval[1], reach[1]))
    return (1, 0) if _is_empty(clipped) else clipped


def _is_empty(interval: Interval) -> bool:
    return interval[0] > interval[1]


def _runs(n: int) -> list[range]:
    return [range(start, stop) for start in range(n) for stop in range(start + 1, n + 1)]


def _rectangles(lanes_q: int, lanes_kv: int) -> list[tuple[range, range]]:
    return [(q, kv) for q in _runs(lanes_q) for kv in _runs(lanes_kv)]


def _cells(q_lanes: range, kv_lanes: range) -> list[tuple[int, int]]:
    return [(a, b) for a in q_lanes for b in kv_lanes]


def _min_cover(needed: set, options: list) -> list | None:
    """Fewest disjoint rectangles covering `needed`, then least area; lanes per rank are few."""

    def score(chosen: list) -> tuple[int, int]:
        return len(chosen), sum(len(q) * len(kv) for (q, kv), _ in chosen)

    best: list | None = None

    def search(uncovered: set, used: set, chosen: list) -> None:
        nonlocal best
        if best is not None and len(chosen) > len(best):
            return
        if not uncovered:
            if best is None or score(chosen) < score(best):
                best = list(chosen)
            return
        cell = min(uncovered)
        for option in options:
            cells = set(_cells(*option[0]))
            if cell in cells and not cells & used:
                search(uncovered - cells, used | cells, chosen + [option])

    search(set(needed), set(), [])
    return best
