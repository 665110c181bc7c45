"""Packed documents, each cut on its own into chunks over every rank ("zigzag" and "contiguous"
document layouts): a document of L tokens takes ceil(L / num_chunks) slots per chunk, padding
included, so every rank holds the same rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.interface import BandMask
from .chunked_sharding import ChunkedSharding
from .document_rows import document_plan
from .rows import RankPlan


@dataclass(frozen=True)
class DocumentSharding(ChunkedSharding):
    varlen = True

    def rank_plan(self, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
        """The ring plan of `rank` (uncached: see rows.rank_plan)."""
        return document_plan(self, mask, rank, device)

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        """int32 boundaries of the documents in `rank`'s local rows, padding slots included (the
        same on every rank for this sharding)."""
        return torch.tensor(self.local_doc_starts, dtype=torch.int32)

    def local_seqused(self, rank: int) -> torch.Tensor:
        """int32 count of valid (non-padding) local slots of each document on `rank`."""
        return torch.tensor(self.lane_rows(rank, range(self.lanes))[1], dtype=torch.int32)

    def local_documents(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local_cu_seqlens(rank), self.local_seqused(rank)
