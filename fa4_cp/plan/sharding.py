"""Sharding: which global tokens each rank's local rows hold, for a sequence or packed documents.

Dense: a batch of sequences of length S, each cut into `num_chunks` equal chunks; S must divide.
Varlen ("zigzag" or "contiguous" per document): packed documents, each cut into `num_chunks`
chunks of ceil(L / num_chunks) slots. The slots past a document's end are padding: they sit at
the end of the document's last chunks, so within every lane, and within every run of a rank's
lanes, the valid slots form a prefix. The "balanced" document layout (placement.py) places each
document on a span of ranks of its own instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.interface import BandMask
from .dense_rows import dense_plan
from .document_rows import document_plan
from .layout import Layout, check_document_layout, get_layout
from .placement import balanced_sharding
from .rows import RankPlan
from .sharding_rows import ShardingRows


@dataclass(frozen=True)
class Sharding(ShardingRows):
    layout: Layout
    world_size: int
    doc_lengths: tuple[int, ...]
    varlen: bool

    @classmethod
    def dense(cls, seq_len: int, world_size: int, layout: str | Layout = "zigzag") -> Sharding:
        layout = get_layout(layout) if isinstance(layout, str) else layout
        layout.check_length(seq_len, world_size, "seq_len")
        return cls(layout, world_size, (seq_len,), varlen=False)

    @classmethod
    def documents(cls, doc_lengths: Sequence[int], world_size: int, layout: str | Layout = "balanced"):
        """Packed documents: "balanced" (the default: each document on a span of ranks of its own,
        see placement.py), or "zigzag" / "contiguous", every document cut over all ranks."""
        if isinstance(layout, str) and check_document_layout(layout) == "balanced":
            return balanced_sharding(tuple(int(n) for n in doc_lengths), world_size)
        layout = get_layout(layout) if isinstance(layout, str) else layout
        return cls(layout, world_size, tuple(int(n) for n in doc_lengths), varlen=True)

    def rank_plan(self, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
        """The ring plan of `rank` (uncached: see rows.rank_plan)."""
        return document_plan(self, mask, rank, device) if self.varlen else dense_plan(self, mask, rank, device)

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

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        """int32 boundaries of the documents in `rank`'s local rows, padding slots included (the
        same on every rank for this sharding)."""
        return torch.tensor(self.local_doc_starts, dtype=torch.int32)

    def local_seqused(self, rank: int) -> torch.Tensor:
        """int32 count of valid (non-padding) local slots of each document on `rank`."""
        return torch.tensor(self.lane_rows(rank, range(self.lanes))[1], dtype=torch.int32)

    def local_documents(self, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.local_cu_seqlens(rank), self.local_seqused(rank)) if self.varlen else None

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
def _token_index(sharding: Sharding, rank: int) -> torch.Tensor:
    index, _ = _local_tokens(sharding, rank)
    return index


@functools.lru_cache(maxsize=256)
def _positions(sharding: Sharding, rank: int) -> torch.Tensor:
    _, positions = _local_tokens(sharding, rank)
    return positions


def _local_tokens(sharding: Sharding, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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
