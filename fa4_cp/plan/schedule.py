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
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..kernels.interface import BandMask
from .layout import Layout

if TYPE_CHECKING:
    from .chunked_sharding import ChunkedSharding

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
    writes_first: tuple[bool, ...]
    """writes_first[rank]: rank's first call covers every local row, so it may overwrite the
    forward's accumulators instead of merging into "no key seen yet" (never with varlen
    documents, whose padding rows no call covers)."""

    def source_rank(self, rank: int, step: int) -> int:
        """Whose KV rank holds at ring step `step`."""
        return (rank - step) % self.world_size


_build_lock = threading.Lock()


def build_schedule(sharding: ChunkedSharding, mask: BandMask, sizes: tuple[int, ...] | None = None) -> RingSchedule:
    """The schedule of every rank (cached); ranks sharing a process build it once.

    It depends on the documents only through their distinct chunk sizes (or `sizes`: the
    schedule of those documents only), so a training run whose packing changes every batch
    reuses it.
    """
    if sizes is None:
        sizes = tuple(sorted({size for size in sharding.chunk_sizes if size > 0})) or (1,)
    with _build_lock:
        return _build_schedule(sharding.layout, sharding.world_size, sizes, mask, sharding.varlen)


@functools.lru_cache(maxsize=64)
def _build_schedule(layout: Layout, world: int, sizes: tuple[int, ...], mask: BandMask, varlen: bool) -> RingSchedule:
    band = band_interval(mask)
    per_rank = [
        [chunk_pair_calls(layout.chunks_of(rank, world), layout.chunks_of((rank - step) % world, world), band, sizes) for step in range(world)]
        for rank in range(world)
    ]
    active = tuple(step for step in range(world) if any(per_rank[rank][step] for rank in range(world)))
    calls = tuple(tuple(per_rank[rank][step] for step in active) for rank in range(world))
    lanes = range(len(layout.chunks_of(0, world)))
    writes_first = tuple(not varlen and bool(active) and bool(mine[0]) and mine[0][0].q_lanes == lanes for mine in calls)
    return RingSchedule(world, active, calls, writes_first)


def band_interval(mask: BandMask) -> Interval:
    """The key offsets j - i a mask lets through, as a closed interval (infinite where unbounded)."""
    return (-math.inf if mask.lo is None else mask.lo, math.inf if mask.hi is None else mask.hi)


@functools.lru_cache(maxsize=4096)
def chunk_pair_calls(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], band: Interval, sizes: tuple[int, ...]) -> tuple[BlockCall, ...]:
    """The calls between the lanes of q chunks `q_chunks` and kv chunks `kv_chunks` of a sequence
    cut into chunks of each of `sizes` slots, from what each lane pair sees."""
    seen = tuple(
        tuple(_seen(band, (kv_chunks[b] - q_chunks[a]) * size, size) for size in sizes)
        for a, b in _cells(range(len(q_chunks)), range(len(kv_chunks)))
    )
    return _cover(len(q_chunks), len(kv_chunks), sizes, seen)


def _seen(band: Interval, global_shift: int, size: int) -> Interval:
    """Key offsets j - i a lane pair sees, in its own coordinates, when the kv chunk starts
    `global_shift` tokens after the q chunk."""
    return _clip((band[0] - global_shift, band[1] - global_shift), (-(size - 1), size - 1))


@functools.lru_cache(maxsize=4096)
def _cover(lanes_q: int, lanes_kv: int, sizes: tuple[int, ...], seen: tuple[tuple[Interval, ...], ...]) -> tuple[BlockCall, ...]:
    """Fewest calls computing exactly `seen` (per lane pair, per size), then least area."""
    lane_pairs = _LanePairs(lanes_kv, sizes, seen)
    needed = {cell for cell in _cells(range(lanes_q), range(lanes_kv)) if lane_pairs.is_visible(*cell)}
    if not needed:
        return ()
    options = [
        (rect, mask)
        for rect in _rectangles(lanes_q, lanes_kv)
        if any(cell in needed for cell in _cells(*rect))
        for mask in [lane_pairs.rectangle_mask(*rect)]
        if mask is not None
    ]
    cover = _min_cover(needed, options)
    if cover is None:
        raise ValueError(
            f"no single band per block computes this mask for chunk sizes {sizes}: "
            "the chunk offsets differ between documents"
        )
    cover.sort(key=lambda option: (-len(option[0][0]), option[0][0].start, option[0][1].start))
    return tuple(BlockCall(q_lanes, kv_lanes, mask) for (q_lanes, kv_lanes), mask in cover)


class _LanePairs:
    """What each lane pair sees, moved into the local coordinates of a rectangle of lane pairs.

    Lane pair (a, b) of a rectangle whose first lanes are (a0, b0) spans the key offsets
    `reach` there; it sees its own `seen` interval shifted by the same amount.
    """

    def __init__(self, lanes_kv: int, sizes: tuple[int, ...], seen: tuple[tuple[Interval, ...], ...]):
        self.lanes_kv, self.sizes, self.seen = lanes_kv, sizes, seen

    def is_visible(self, a: int, b: int) -> bool:
        return any(not _is_empty(seen) for seen in self.seen[a * self.lanes_kv + b])

    def _in_rectangle(self, a: int, b: int, a0: int, b0: int, index: int) -> tuple[Interval, Interval]:
        size = self.sizes[index]
        shift = ((b - b0) - (a - a0)) * size
        seen = self.seen[a * self.lanes_kv + b][index]
        reach = (shift - (size - 1), shift + (size - 1))
        return reach, seen if _is_empty(seen) else (seen[0] + shift, seen[1] + shift)

    def rectangle_mask(self, q_lanes: range, kv_lanes: range) -> BandMask | None:
        """One band computing exactly what every lane pair of the rectangle sees, for every size, or None.

        A valid band's lower edge is pinned by a partly seen lane pair, or can slide down to just past
        an unseen one, or to -inf; likewise the upper edge. Those are the only candidates.
        """
        a0, b0 = q_lanes.start, kv_lanes.start
        geometry = [
            self._in_rectangle(a, b, a0, b0, index)
            for a, b in _cells(q_lanes, kv_lanes)
            for index in range(len(self.sizes))
        ]
        lows, highs = {-math.inf}, {math.inf}
        for reach, seen in geometry:
            if _is_empty(seen):
                lows.add(reach[1] + 1)
                highs.add(reach[0] - 1)
            else:
                lows.add(seen[0])
                highs.add(seen[1])
        candidates = sorted(((lo, hi) for lo in lows for hi in highs), key=lambda c: ((c[0] != -math.inf) + (c[1] != math.inf), c))
        for candidate in candidates:
            if all(_clip(candidate, reach) == seen for reach, seen in geometry):
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
