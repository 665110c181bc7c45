"""The "balanced" document layout: every packed document gets a span of ranks of its own, so that
short documents stay whole, long ones are cut into chunks a kernel tile or more long, only what
is cut travels, and every rank gets the same attention work.

Cutting every document over all W ranks (the "zigzag" document layout) makes a short document a
few rows per rank. FA4's varlen kernel gives each sequence its own 128-row tiles, so most of each
tile is padding, and every ring step carries KV that only its own rank needed. Here document d
of L tokens has a span of g ranks, first..first + g - 1 (mod W):
- g = 1: kept whole on that rank; its attention runs at ring step 0 against the rank's own KV,
  which never travels;
- g > 1: cut into 2g chunks of ceil(L / 2g) slots, zigzag over the span (the span's i-th rank
  holds chunks i and 2g - 1 - i); its chunks travel both ways round the span, each only to the
  span's ranks that read them (span_rows.py), at steps 1..g-1.
Every rank's local rows are [its spans' chunks, in document order | its kept documents |
padding].
Ranks are padded to equal local rows: equal shapes keep the non-attention layers' work, FSDP's
collectives and compiled graphs the same on every rank (the slowest rank sets the step), and let
the cross-rank check compare shapes; bench/varlen.py reports the padding fraction. The placement
is a deterministic function of the document lengths and W, the same on every rank, with no
communication.

Cost model: the ring kernels' forward + backward time of each rank's blocks, as
tuning/kernel_cost.py fits it on a one-GPU replay of the ring (tile pairs, a fixed cost per q
tile of the forward and per KV tile of the backward, which make a short piece of a long document
dearer per FLOP than a whole short one), the fixed cost (launches, work beside attention)
of every ring step that the widest span adds, and, choosing between the greedy's placements, what
each rank's own remote blocks cost it beside their tiles (`rank_costs_ms`). Documents are placed
longest first, as longest-processing-time scheduling does: each takes the smallest span g in 1,
2, 4, ... W, and the window of g ranks with room for its rows (up to ceil(S / W) + 128 per rank),
that keeps every rank within 3% of the mean load; if none does, the (span, window) that leaves
the most loaded rank least loaded. The greedy runs a few ways and the placement it keeps is the
one the model finds fastest (`modelled_ms`: each pass's most loaded rank, which the ring waits
for), at the heads a ring rank of the mesh holds (`placement_heads`: a launch weighs more against
fewer heads' tiles):
- by the cost placed so far, the mean counting what is left whole (one device's costs, and the
  ring's);
- by projected load: every rank ends near the row limit, so a rank of costly long-document
  chunks will still take its share of the rest, at what the documents left cost per row. Without
  it, the last short documents of a fine-tuning-like mix land on whichever ranks still have rows,
  or are cut over several to find them;
- the ring's runs again with the mean load their first pass reached as the target's floor
  (cutting adds work that a mean counted whole misses);
- by projected load once more, a widened span charged three steps' cost per added step: a
  widening that is cheap early can leave the last short documents no balanced room (fine-tuning-
  like W = 16: 1.87 against 1.97 ms modelled, imbalance 1.014 against 1.097).
So the threshold between whole and cut, and how widely to cut, come from the cost model and the
mix, not from constants. The placement kept then trades kept documents off its most loaded ranks
(kept_trades.py), which the greedy, placing the longest first, cannot revisit: first evening the
ranks' loads, then lowering each pass's maximum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.interface import BandMask
from .rows import RankPlan
from ..tuning.kernel_cost import CALIBRATED_HEAD_DIM, CALIBRATED_HEADS, ONE_DEVICE, RING, TILE, KernelCosts, remote_us, span_us, step_other_us, step_us
from .kept_trades import kept_documents_traded
from .sharding_rows import ShardingRows
from .span_rows import span_plan

SLACK = 1.03


@dataclass(frozen=True)
class BalancedSharding(ShardingRows):
    world_size: int
    doc_lengths: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    """Per document: (first rank, number of ranks); (0, 0) for an empty document."""
    local_len: int

    layout_name = "balanced"
    varlen = True

    @property
    def total_len(self) -> int:
        return sum(self.doc_lengths)

    def rank_plan(self, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
        """The ring plan of `rank` (uncached: see rows.rank_plan)."""
        return span_plan(self, mask, rank, device)

    def chunk_size(self, doc: int) -> int:
        """Slots per chunk of a document spread over its span (its length if kept whole)."""
        length, (_, ranks) = self.doc_lengths[doc], self.spans[doc]
        return length if ranks == 1 else math.ceil(length / (2 * ranks))

    def chunk_slots(self, doc: int, chunk: int) -> int:
        """Valid (non-padding) slots of chunk `chunk` of document `doc`."""
        size = self.chunk_size(doc)
        return min(max(self.doc_lengths[doc] - chunk * size, 0), size)

    @functools.cached_property
    def rank_rows(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Per rank, (document, index in its span, first local row) of every document there:
        spread ones first, then kept ones, each group in document order."""
        spread: list[list[tuple[int, int]]] = [[] for _ in range(self.world_size)]
        kept: list[list[int]] = [[] for _ in range(self.world_size)]
        for doc, (first, ranks) in enumerate(self.spans):
            if ranks == 1:
                kept[first].append(doc)
            for index in range(ranks if ranks > 1 else 0):
                spread[(first + index) % self.world_size].append((doc, index))
        table = []
        for rank in range(self.world_size):
            rows, start = [], 0
            for doc, index in spread[rank]:
                rows.append((doc, index, start))
                start += 2 * self.chunk_size(doc)
            for doc in kept[rank]:
                rows.append((doc, 0, start))
                start += self.doc_lengths[doc]
            table.append(tuple(rows))
        return tuple(table)

    @functools.cached_property
    def starts(self) -> tuple[dict[int, int], ...]:
        """Per rank, each of its documents' first local row."""
        return tuple({doc: start for doc, _, start in rows} for rows in self.rank_rows)

    @functools.cached_property
    def causal_kv_rows(self) -> tuple[int, ...]:
        """Per rank, the KV rows that a causal mask needs from its spans' other ranks: one chunk
        of each earlier span rank, both chunks of each later one. What the balanced ring's
        streams carry under a causal mask (no more: tests/test_schedule.py), in closed form."""
        rows = [0] * self.world_size
        for doc, (first, ranks) in enumerate(self.spans):
            for member in range(ranks if ranks > 1 else 0):
                rows[(first + member) % self.world_size] += self.chunk_size(doc) * (member + 2 * (ranks - 1 - member))
        return tuple(rows)

    def local_sequences(self, rank: int) -> list[tuple[int, int, int]]:
        """(first row, valid rows, rows) of each of rank's local sequences: a spread document's two
        chunks (valid slots first), a kept document."""
        sequences = []
        for doc, index, start in self.rank_rows[rank]:
            ranks = self.spans[doc][1]
            if ranks == 1:
                sequences.append((start, self.doc_lengths[doc], self.doc_lengths[doc]))
            else:
                used = self.chunk_slots(doc, index) + self.chunk_slots(doc, 2 * ranks - 1 - index)
                sequences.append((start, used, 2 * self.chunk_size(doc)))
        return sequences

    def token_index(self, rank: int) -> torch.Tensor:
        return _local_tokens(self, rank)[0]

    def positions(self, rank: int) -> torch.Tensor:
        """Per local slot, the token's position in its document; 0 on padding."""
        return _local_tokens(self, rank)[1]

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        """int32 boundaries of `rank`'s local sequences, the last running to the end of the padding."""
        return torch.tensor([*(start for start, _, _ in self.local_sequences(rank)), self.local_len], dtype=torch.int32)

    def local_seqused(self, rank: int) -> torch.Tensor:
        """int32 count of valid slots of each of `rank`'s local sequences."""
        return torch.tensor([used for _, used, _ in self.local_sequences(rank)], dtype=torch.int32)

    def local_documents(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local_cu_seqlens(rank), self.local_seqused(rank)


@functools.lru_cache(maxsize=256)
def _local_tokens(sharding: BalancedSharding, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    document_starts = [0]
    for length in sharding.doc_lengths[:-1]:
        document_starts.append(document_starts[-1] + length)
    index = torch.full((sharding.local_len,), -1, dtype=torch.long)
    positions = torch.zeros(sharding.local_len, dtype=torch.long)
    for doc, span_index, start in sharding.rank_rows[rank]:
        ranks, size = sharding.spans[doc][1], sharding.chunk_size(doc)
        chunks = (0,) if ranks == 1 else (span_index, 2 * ranks - 1 - span_index)
        for lane, chunk in enumerate(chunks):
            valid = sharding.chunk_slots(doc, chunk)
            rows = slice(start + lane * size, start + lane * size + valid)
            positions[rows] = torch.arange(chunk * size, chunk * size + valid)
            index[rows] = positions[rows] + document_starts[doc]
    return index, positions


def span_rows(length: int, ranks: int) -> int:
    """Local rows a document takes on each rank of a span of `ranks`."""
    return length if ranks == 1 else 2 * math.ceil(length / (2 * ranks))


@functools.lru_cache(maxsize=65536)
def span_cost(length: int, ranks: int, costs: KernelCosts = RING) -> float:
    """Modelled FA4 forward + backward time (us, 64 heads) of a document on each rank of a span of
    `ranks` (tuning/kernel_cost.py)."""
    return sum(span_us(length, ranks, costs=costs))


_span_us = functools.lru_cache(maxsize=65536)(span_us)  # every candidate placement costs the same documents again


def rank_costs_ms(
    sharding: BalancedSharding, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM,
) -> list[tuple[float, float]]:
    """Each rank's modelled (forward, backward) ms under the placement: the ring's kernel costs
    (kernel_cost.py) of its share of every document's span, and what its remote blocks cost it
    beside their tiles (kernel_cost.remote_us)."""
    costs = [[0.0, 0.0] for _ in range(sharding.world_size)]
    for length, (first, ranks) in zip(sharding.doc_lengths, sharding.spans):
        if not ranks:  # an empty document
            continue
        forward, backward = _span_us(length, ranks, heads, head_dim)
        for offset in range(ranks):
            cost = costs[(first + offset) % sharding.world_size]
            cost[0] += forward / 1e3
            cost[1] += backward / 1e3
    forward_reach, backward_reach = remote_reach(sharding.spans, sharding.world_size)
    remote = remote_us(forward_reach + backward_reach, heads, head_dim)
    return [(forward + float(remote[0][rank]) / 1e3, backward + float(remote[1][rank]) / 1e3) for rank, (forward, backward) in enumerate(costs)]


def remote_reach(spans, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, the furthest step at which it reads a span's KV from the forward stream (an
    earlier member: its own index in the span) and from the backward stream (a later member);
    their sum is the number of (step, stream) pairs at which the rank's plan launches blocks
    against another rank's KV (span_rows.py: member i reads member j at step |i - j|)."""
    forward, backward = np.zeros(world_size, dtype=np.int64), np.zeros(world_size, dtype=np.int64)
    for first, ranks in spans:
        if ranks > 1:
            members, index = _members(world_size, first, ranks), np.arange(ranks)
            forward[members] = np.maximum(forward[members], index)
            backward[members] = np.maximum(backward[members], ranks - 1 - index)
    return forward, backward


def modelled_ms(sharding: BalancedSharding, heads: int = CALIBRATED_HEADS) -> float:
    """The placement's modelled time at `heads` q heads of 128 per ring rank: the forward's most
    loaded rank and the backward's (`rank_costs_ms`; the ring waits for each pass's, as
    tuning/mesh_model.py counts it) and the work beside attention of every ring step that its
    widest span takes."""
    widest = max((ranks for _, ranks in sharding.spans), default=1)
    return sum(slowest_rank_ms(sharding, heads)) + widest * step_other_us() / 1e3


def slowest_rank_ms(
    sharding: BalancedSharding, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM,
) -> tuple[float, float]:
    """Each pass's most loaded ring rank under the placement at `heads` q heads (`rank_costs_ms`):
    forward and backward ms, which the ring waits for."""
    costs = rank_costs_ms(sharding, heads, head_dim)
    return max(forward for forward, _ in costs), max(backward for _, backward in costs)


def placement_heads(ulysses: int) -> int:
    """The q heads per ring rank at which the layout prices a placement: a 64-head model's share
    under a `ulysses`-way split. A function of the mesh alone, since `shard` (which knows no
    model) and the attention call must place the same documents alike. A launch costs the same
    at any heads while a tile's work shrinks with them, so where a ring rank holds few heads
    (a 2-D split) the placement with fewer blocks wins (bench/fit_placement_costs.py)."""
    return max(CALIBRATED_HEADS // ulysses, 1)


@functools.lru_cache(maxsize=64)
def balanced_sharding(doc_lengths: tuple[int, ...], world_size: int, heads: int = CALIBRATED_HEADS) -> BalancedSharding:
    """The placement of `doc_lengths` on `world_size` ranks (cached: a batch's layers share it):
    of the greedy placements by cost alone and by projected load, the one whose passes' most loaded
    ranks, with the ring steps' fixed cost and the remote blocks' own cost (`modelled_ms`), cost
    least at `heads` q heads per ring rank (`placement_heads`), with its kept documents then traded
    off the most loaded ranks (kept_trades.py)."""
    if world_size == 1:
        spans = tuple((0, 1 if length else 0) for length in doc_lengths)
        return BalancedSharding(1, doc_lengths, spans, sum(doc_lengths))
    picked = min(placement_candidates(doc_lengths, world_size, heads), key=lambda pair: pair[0])[1]
    costs = np.array(rank_costs_ms(picked, heads))
    spans, local_len = kept_documents_traded(doc_lengths, picked.spans, costs, placed_rows(picked), heads, CALIBRATED_HEAD_DIM)
    return BalancedSharding(world_size, doc_lengths, spans, local_len)


def placed_rows(sharding: BalancedSharding) -> np.ndarray:
    """Each rank's local rows under the placement, padding excluded."""
    rows = np.zeros(sharding.world_size, dtype=np.int64)
    for length, (first, ranks) in zip(sharding.doc_lengths, sharding.spans):
        if ranks:
            rows[first if ranks == 1 else _members(sharding.world_size, first, ranks)] += span_rows(length, ranks)
    return rows


def placement_candidates(doc_lengths: tuple[int, ...], world_size: int, heads: int = CALIBRATED_HEADS) -> list[tuple[float, BalancedSharding]]:
    """(modelled_ms at `heads`, placement) of every greedy run that `balanced_sharding` chooses
    from. The runs themselves cost documents at 64 heads: the heads only weigh the choice."""
    placements = []
    for costs, project in ((ONE_DEVICE, False), (RING, False), (RING, True)):
        floor = 0.0
        # the ring's runs again, with the mean load their first pass reached as the target's floor
        for _ in range(2 if costs is RING else 1):
            floor, sharding = _greedy_placement(doc_lengths, world_size, costs, project, floor)
            placements.append(sharding)
    # Once more with a widened span charged three ring steps a step: placing longest first, a
    # widening that is cheap early can leave the last short documents no balanced room
    placements.append(_greedy_placement(doc_lengths, world_size, RING, True, 0.0, widening=3.0)[1])
    return [(modelled_ms(sharding, heads), sharding) for sharding in placements]


def _greedy_placement(
    doc_lengths: tuple[int, ...], world_size: int, costs: KernelCosts, project: bool, floor: float, widening: float = 1.0,
) -> tuple[float, BalancedSharding]:
    """Longest first, each document's narrowest span (and least loaded window) that keeps every
    rank within SLACK of the mean load; with `project`, a rank's load counts the rows it will
    still take at what the documents left cost per row; `floor`, a least mean load for the
    target; `widening`, what a span wider than any so far is charged per added step, in ring
    steps. Returns (the mean load under `costs`, the placement)."""
    spans = [(0, 0)] * len(doc_lengths)
    capacity = math.ceil(sum(doc_lengths) / world_size) + TILE
    cost, rows = np.zeros(world_size), np.zeros(world_size, dtype=np.int64)
    order = sorted((doc for doc, length in enumerate(doc_lengths) if length), key=lambda doc: (-doc_lengths[doc], doc))
    # keyed by ints alone: hashing the frozen costs on every lookup was a tenth of the placement's time
    span_cost_of = functools.lru_cache(maxsize=None)(lambda length, ranks: span_cost(length, ranks, costs))
    whole = sum(span_cost_of(length, 1) for length in doc_lengths if length)  # the documents not yet placed, kept whole
    rows_left, widest = sum(doc_lengths), 1
    step = widening * step_us() if costs is RING else 0.0  # the one-device model knows no steps
    for doc in order:
        length, best = doc_lengths[doc], None
        whole -= span_cost_of(length, 1)
        rows_left -= length
        # Every rank ends near `capacity` rows: a rank of costly long-document chunks is loaded
        # however few its rows, since it will still take its share of what is left
        rate = whole / rows_left if project and rows_left else 0.0
        loads = cost + (capacity - rows) * rate if rate else cost  # read only until the document is placed
        # the mean load if every document left stays whole: spreading the long ones first costs
        # work that a fixed one-device target would count as imbalance
        mean = (loads.sum() + span_cost_of(length, 1) + (whole if not project else -length * rate)) / world_size
        target = SLACK * max(floor, mean)
        for ranks, top_loads, top_rows in _window_maxima(loads, rows):
            more_rows = span_rows(length, ranks)
            with_room = np.where(top_rows <= capacity - more_rows, top_loads, np.inf)
            first = int(with_room.argmin())  # the least loaded window, the lowest first rank of equals
            loaded = float(with_room[first])
            if loaded == np.inf:
                continue
            # a span wider than any so far adds ring steps, and their fixed cost, to every rank
            added = span_cost_of(length, ranks) - more_rows * rate + max(0, ranks - widest) * step
            score = (loaded + added, ranks * span_cost_of(length, ranks), ranks)
            if best is None or score < best[0]:
                best = (score, ranks, first)
            if score[0] <= target:
                break  # the narrowest span that keeps the ranks balanced
        _, ranks, first = best or (None, world_size, 0)  # nothing has room: spread over every rank
        members = first if ranks == 1 else _members(world_size, first, ranks)
        cost[members] += span_cost_of(length, ranks)
        rows[members] += span_rows(length, ranks)
        spans[doc] = (first, ranks)
        widest = max(widest, ranks)
    return float(cost.mean()), BalancedSharding(world_size, doc_lengths, tuple(spans), int(rows.max()))


def span_widths(world_size: int) -> list[int]:
    """The span widths the placement tries, narrowest first: 1, 2, 4, ... below W, then W."""
    return [1 << i for i in range(world_size.bit_length()) if 1 << i < world_size] + [world_size]


def _window_maxima(loads: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per span width (`span_widths`): the width and the maxima of `loads` and of `rows` over the
    window of that many consecutive ranks (mod W) that each rank begins. Lazily: most documents
    take the first width."""
    world, covered = len(loads), 1
    for width in span_widths(world):
        if width == world:
            yield world, np.full(world, loads.max()), np.full(world, rows.max())
            return
        while covered < width:
            ahead = _shifted(world, covered)  # window [i, i + 2w) = [i, i + w) and [i + w, i + 2w)
            loads, rows = np.maximum(loads, loads.take(ahead)), np.maximum(rows, rows.take(ahead))
            covered *= 2
        yield width, loads, rows


def _members(world: int, first: int, ranks: int) -> np.ndarray:
    """The ranks of a span of `ranks` beginning at `first` (mod world), in member order."""
    return (first + np.arange(ranks)) % world


@functools.lru_cache(maxsize=256)
def _shifted(world: int, shift: int) -> np.ndarray:
    """Rank i + shift (mod world) for each rank i."""
    return (np.arange(world) + shift) % world
