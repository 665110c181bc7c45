"""Tokens over a 2-D Ulysses x ring mesh of u x r ranks.

The ring's own sharding over its r ranks (zigzag for a sequence, balanced or per-document for
packed documents) decides which tokens each ring rank holds; that rank's rows, padded at the end
to a multiple of u, are then cut into u contiguous pieces, one per ulysses rank (rank j * u + i
holds piece i of ring rank j). The all-to-all that turns sequence shards into head shards puts
the pieces back together in order, so the ring sees exactly the rows of its 1-D sharding, and
every mask, layout and document feature of the ring carries over unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .sharding_rows import ShardingRows


@dataclass(frozen=True)
class MeshSharding(ShardingRows):
    ring: ShardingRows
    """The ring's sharding over its r ranks."""
    ulysses: int

    def __post_init__(self):
        if not self.ring.varlen and self.ring_rows % self.ulysses:
            raise ValueError(
                f"q: each of the {self.ring.world_size} ring ranks holds {self.ring_rows} tokens of the sequence, "
                f"which do not split over {self.ulysses} ulysses ranks"
            )

    @property
    def world_size(self) -> int:
        return self.ring.world_size * self.ulysses

    @property
    def varlen(self) -> bool:
        return self.ring.varlen

    @property
    def layout_name(self) -> str:
        return self.ring.layout_name

    @property
    def total_len(self) -> int:
        return self.ring.total_len

    @property
    def ring_rows(self) -> int:
        """Rows of each ring rank, as the ring loop sees them."""
        return self.ring.local_len

    @property
    def padded_ring_rows(self) -> int:
        return math.ceil(self.ring_rows / self.ulysses) * self.ulysses

    @property
    def local_len(self) -> int:
        """Rows of each mesh rank."""
        return self.padded_ring_rows // self.ulysses

    def token_index(self, rank: int) -> torch.Tensor:
        return self._piece(self.ring.token_index, rank, -1)

    def positions(self, rank: int) -> torch.Tensor:
        return self._piece(self.ring.positions, rank, 0)

    def _piece(self, of_ring_rank, rank: int, pad: int) -> torch.Tensor:
        ring_rank, ulysses_rank = divmod(rank, self.ulysses)
        rows = of_ring_rank(ring_rank)
        padded = torch.cat([rows, rows.new_full((self.padded_ring_rows - self.ring_rows,), pad)])
        return padded[ulysses_rank * self.local_len : (ulysses_rank + 1) * self.local_len]


@functools.lru_cache(maxsize=64)
def mesh_sharding(ring: ShardingRows, ulysses: int) -> MeshSharding:
    return MeshSharding(ring, ulysses)
