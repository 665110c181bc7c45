"""What every kind of sharding shares: which global token each local row holds (`token_index`),
and shard / unshard through it. The kinds, a file each: dense and per-document chunks
(dense_sharding.py, document_sharding.py), balanced document spans (placement.py), each of which
plans a rank's ring (`rank_plan`), and the 2-D mesh's (mesh_sharding.py). sharding.py makes them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class ShardingRows(ABC):
    """shard / unshard through `token_index` (-1 on padding), for every kind of sharding."""

    world_size: int
    varlen: bool

    @property
    @abstractmethod
    def layout_name(self) -> str:
        """The layout the tokens follow, as a user names it ("zigzag", "balanced", ...)."""

    @abstractmethod
    def token_index(self, rank: int) -> torch.Tensor:
        """Per local slot, the token's index in the unsharded sequence; -1 on padding."""

    @property
    @abstractmethod
    def total_len(self) -> int: ...

    @abstractmethod
    def positions(self, rank: int) -> torch.Tensor:
        """Per local slot, the token's position in its document (the sequence, if dense); 0 on padding."""

    def local_documents(self, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cu_seqlens, seqused) int32 of the documents in `rank`'s local rows, as a varlen kernel
        takes them; None where the rows are not one ring rank's documents."""
        return None

    def shard(self, x: torch.Tensor, rank: int, seq_dim: int = 1, pad_value: float = 0) -> torch.Tensor:
        """Rank's local rows of the unsharded `x`, padding slots filled with `pad_value`."""
        index = self.token_index(rank).to(x.device)
        if x.shape[seq_dim] != self.total_len:
            raise ValueError(f"x: expected {self.total_len} tokens along dim {seq_dim}, got shape {tuple(x.shape)}")
        if not self.varlen:
            return x.index_select(seq_dim, index)
        local = x.index_select(seq_dim, index.clamp(min=0))
        pad = (index < 0).view([-1 if d == seq_dim % x.ndim else 1 for d in range(x.ndim)])
        return local.masked_fill(pad, pad_value)

    def unshard(self, shards: Sequence[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
        """The unsharded tensor from every rank's local rows, in rank order; padding is dropped."""
        if len(shards) != self.world_size:
            raise ValueError(f"shards: expected {self.world_size} tensors, one per rank, got {len(shards)}")
        shape = list(shards[0].shape)
        shape[seq_dim] = self.total_len
        full = shards[0].new_empty(shape)
        for rank, local in enumerate(shards):
            index = self.token_index(rank).to(local.device)
            keep = (index >= 0).nonzero().squeeze(-1)
            full.index_copy_(seq_dim, index[keep], local.index_select(seq_dim, keep))
        return full
