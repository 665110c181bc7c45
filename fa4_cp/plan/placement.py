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

Cost model: FA4's forward + backward time of each rank's blocks, as tuning/kernel_cost.py models
it from one-GPU runs (tile pairs, and a fixed cost per KV tile of the backward, which makes a
short piece of a long document dearer per FLOP than a whole short one). Documents are placed longest first, as longest-processing-
time scheduling does: each takes the smallest span g in 1, 2, 4, ... W, and the window of g
ranks with room for its rows (up to ceil(S / W) + 128 per rank), that keeps every rank within 3%
of the mean cost (the cost placed so far plus what is left, counted whole); if none does, the (span, window) that leaves the most loaded rank least loaded.
So the threshold between whole and cut, and how widely to cut, come from the cost model and the
mix, not from constants.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass

import torch

from ..kernels.interface import BandMask
from .rows import RankPlan
from ..tuning.kernel_cost import TILE, span_us
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


def span_cost(length: int, ranks: int) -> float:
    """Modelled FA4 forward + backward time (us, 64 heads) of a document on each rank of a span of
    `ranks` (tuning/kernel_cost.py, fitted on one-GPU runs)."""
    return sum(span_us(length, ranks))


@functools.lru_cache(maxsize=64)
def balanced_sharding(doc_lengths: tuple[int, ...], world_size: int) -> BalancedSharding:
    """The placement of `doc_lengths` on `world_size` ranks (cached: a batch's layers share it)."""
    spans = [(0, 0)] * len(doc_lengths)
    if world_size == 1:
        spans = [(0, 1 if length else 0) for length in doc_lengths]
        return BalancedSharding(1, doc_lengths, tuple(spans), sum(doc_lengths))
    capacity = math.ceil(sum(doc_lengths) / world_size) + TILE
    widths = sorted({*(2**k for k in range(world_size.bit_length()) if 2**k < world_size), world_size})
    cost, rows = [0.0] * world_size, [0] * world_size
    order = sorted((doc for doc, length in enumerate(doc_lengths) if length), key=lambda doc: (-doc_lengths[doc], doc))
    whole = sum(span_cost(length, 1) for length in doc_lengths if length)  # of the documents not yet placed, kept whole
    for doc in order:
        length, best = doc_lengths[doc], None
        # the mean load if every document left stays whole: spreading the long ones first costs
        # work that a fixed one-device target would count as imbalance
        target = SLACK * (sum(cost) + whole) / world_size
        whole -= span_cost(length, 1)
        for ranks in widths:
            window = _least_loaded_window(cost, rows, ranks, span_rows(length, ranks), capacity)
            if window is None:
                continue
            loaded, first = window
            score = (loaded + span_cost(length, ranks), ranks * span_cost(length, ranks), ranks)
            if best is None or score < best[0]:
                best = (score, ranks, first)
            if score[0] <= target:
                break  # the narrowest span that keeps the ranks balanced
        _, ranks, first = best or (None, world_size, 0)  # nothing has room: spread over every rank
        for offset in range(ranks):
            rank = (first + offset) % world_size
            cost[rank] += span_cost(length, ranks)
            rows[rank] += span_rows(length, ranks)
        spans[doc] = (first, ranks)
    return BalancedSharding(world_size, doc_lengths, tuple(spans), max(rows))


def _least_loaded_window(cost: list[int], rows: list[int], ranks: int, more_rows: int, capacity: int) -> tuple[int, int] | None:
    """(its most loaded rank's cost, first rank) of the window of `ranks` consecutive ranks (mod W)
    with room for `more_rows` on each whose most loaded rank is least loaded; None if none has room."""
    world = len(cost)
    best = None
    top_cost: collections.deque[int] = collections.deque()  # sliding maxima, as indices
    top_rows: collections.deque[int] = collections.deque()
    for end in range(world + ranks - 1):
        for top, values in ((top_cost, cost), (top_rows, rows)):
            while top and values[top[-1] % world] <= values[end % world]:
                top.pop()
            top.append(end)
        first = end - ranks + 1
        if first < 0:
            continue
        for top in (top_cost, top_rows):
            while top[0] < first:
                top.popleft()
        if rows[top_rows[0] % world] + more_rows <= capacity and (best is None or cost[top_cost[0] % world] < best[0]):
            best = (cost[top_cost[0] % world], first)
    return best
