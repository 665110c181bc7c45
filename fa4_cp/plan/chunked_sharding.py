"""What the chunked shardings share: every sequence or packed document cut into `num_chunks`
equal chunks of ceil(L / num_chunks) slots, the layout (zigzag, contiguous) dealing them to the
ranks. The slots past a document's end are padding: they sit at the end of the document's last
chunks, so within every lane, and within every run of a rank's lanes, the valid slots form a
prefix. The kinds: DenseSharding (one sequence, dense_sharding.py) and DocumentSharding (packed
documents, document_sharding.py)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .layout import Layout
from .sharding_rows import ShardingRows


@dataclass(frozen=True)
class ChunkedSharding(ShardingRows):
    layout: Layout
    world_size: int
    doc_lengths: tuple[int, ...]
    """One entry, the sequence's length, for a dense sequence."""

    @property
    def layout_name(self) -> str:
        return self.layout.name

    @property
    def num_chunks(self) -> int:
        return self.layout.num_chunks(self.world_size)

    @property
    def lanes(self) -> int:
        return len(self.chunks_of(0))

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        return self.layout.chunks_of(rank, self.world_size)

    @functools.cached_property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Slots per chunk, per document."""
        return tuple(math.ceil(n / self.num_chunks) for n in self.doc_lengths)

    @functools.cached_property
    def local_doc_starts(self) -> tuple[int, ...]:
        """Where each document's slots start in a rank's local rows, plus the end (same on all ranks)."""
        starts = [0]
        for size in self.chunk_sizes:
            starts.append(starts[-1] + self.lanes * size)
        return tuple(starts)

    @property
    def local_len(self) -> int:
        return self.local_doc_starts[-1]

    @property
    def total_len(self) -> int:
        return sum(self.doc_lengths)

    def lane_slots(self, rank: int, lane: int, doc: int) -> int:
        """Valid (non-padding) slots of document `doc` in `rank`'s lane `lane`."""
        size = self.chunk_sizes[doc]
        return min(max(self.doc_lengths[doc] - self.chunks_of(rank)[lane] * size, 0), size)

    def token_index(self, rank: int) -> torch.Tensor:
        """Per local slot, the token's index in the unsharded sequence; -1 on padding."""
        return _token_index(self, rank)

    def positions(self, rank: int) -> torch.Tensor:
        """Per local slot, the token's position in its document (the sequence, if dense); 0 on padding."""
        return _positions(self, rank)

    def lane_rows(self, rank: int, lanes: range) -> tuple[list[int], list[int]]:
        """Varlen rows of a run of lanes: per document the start slot (plus the end), and the valid count."""
        starts = [doc_start + lanes.start * size for doc_start, size in zip(self.local_doc_starts, self.chunk_sizes)]
        used = [sum(self.lane_slots(rank, lane, doc) for lane in lanes) for doc in range(len(self.doc_lengths))]
        return starts + [self.local_len], used

    def lane_slice(self, lanes: range) -> slice:
        """Dense rows of a run of lanes."""
        size = self.chunk_sizes[0]
        return slice(lanes.start * size, lanes.stop * size)


@functools.lru_cache(maxsize=256)
def _token_index(sharding: ChunkedSharding, rank: int) -> torch.Tensor:
    index, _ = _local_tokens(sharding, rank)
    return index


@functools.lru_cache(maxsize=256)
def _positions(sharding: ChunkedSharding, rank: int) -> torch.Tensor:
    _, positions = _local_tokens(sharding, rank)
    return positions


def _local_tokens(sharding: ChunkedSharding, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    index, positions = [], []
    doc_start = 0
    for length, size in zip(sharding.doc_lengths, sharding.chunk_sizes):
        for chunk in sharding.chunks_of(rank):
            position = torch.arange(chunk * size, (chunk + 1) * size)
            valid = position < length
            index.append(torch.where(valid, doc_start + position, -1))
            positions.append(torch.where(valid, position, 0))
        doc_start += length
    return torch.cat(index), torch.cat(positions)
