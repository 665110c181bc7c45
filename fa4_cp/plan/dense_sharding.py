"""A dense sequence (a batch of them, all of one length) cut into equal chunks over the ranks;
its length must divide (Layout.check_length)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.interface import BandMask
from .chunked_sharding import ChunkedSharding
from .dense_rows import dense_plan
from .rows import RankPlan


@dataclass(frozen=True)
class DenseSharding(ChunkedSharding):
    varlen = False

    def rank_plan(self, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
        """The ring plan of `rank` (uncached: see rows.rank_plan)."""
        return dense_plan(self, mask, rank, device)
