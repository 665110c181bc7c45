"""The Ulysses all-to-all: sequence shards to head shards over the ulysses ranks, and back.

Rank i of u holds rows piece i of its ring rank's rows, all heads. Before the ring, every rank
sends head group j of its piece to rank j and stacks the pieces it receives in rank order: it then
holds all of the ring rank's rows for head group i. After the ring, the reverse exchange brings
each rank its own rows of every head group. The backward of one exchange is the other
(mesh_attention.py runs them; mesh_ops.py makes the pair differentiable).
"""

from __future__ import annotations

import torch

from ..comm.group import RingGroup


def _exchange(x: torch.Tensor, group: RingGroup, split_dim: int, cat_dim: int) -> torch.Tensor:
    if group.world_size == 1:
        return x
    pieces = [piece.contiguous() for piece in x.chunk(group.world_size, dim=split_dim)]
    return torch.cat(group.all_to_all(pieces, "the Ulysses all-to-all"), dim=cat_dim)


def sequence_to_heads(x: torch.Tensor, group: RingGroup) -> torch.Tensor:
    """(..., s/u, h, d) of every head -> (..., s, h/u, d) of this rank's head group."""
    return _exchange(x, group, -2, -3)


def heads_to_sequence(x: torch.Tensor, group: RingGroup) -> torch.Tensor:
    """The inverse of `sequence_to_heads`."""
    return _exchange(x, group, -3, -2)


def lse_heads_to_sequence(lse: torch.Tensor, group: RingGroup) -> torch.Tensor:
    """lse (..., h/u, s) of this rank's head group -> (..., h, s/u) of its own rows."""
    return _exchange(lse, group, -1, -2)


def lse_sequence_to_heads(lse: torch.Tensor, group: RingGroup) -> torch.Tensor:
    """The inverse of `lse_heads_to_sequence`."""
    return _exchange(lse, group, -2, -1)


def kv_heads_for(kv_heads: int, ulysses: int) -> torch.Tensor | None:
    """Which KV heads travel to each ulysses rank when there are fewer than ranks: rank i's q
    heads all read KV head i * h_kv / u, so each KV head is repeated u / h_kv times, never to h.
    None when every rank takes h_kv / u heads of its own."""
    if kv_heads >= ulysses:
        return None
    return torch.tensor([i * kv_heads // ulysses for i in range(ulysses)])
