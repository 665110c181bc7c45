"""`Sharding`: which global tokens each rank's local rows hold, made for a sequence or for packed
documents. One protocol (sharding_rows.ShardingRows: token_index, positions, shard, unshard,
local_documents, and each kind's own `rank_plan(mask, rank, device)`), a file per kind:
- dense_sharding.py: a sequence cut into equal chunks (zigzag or contiguous);
- document_sharding.py: packed documents, each cut into chunks over every rank;
- placement.py: the balanced document layout, each document on a span of ranks of its own;
- mesh_sharding.py: any of them over a 2-D Ulysses x ring mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

from .dense_sharding import DenseSharding
from .document_sharding import DocumentSharding
from .layout import Layout, check_document_layout, get_layout
from .placement import BalancedSharding, balanced_sharding, placement_heads


class Sharding:
    """The sharding kinds' makers (`fa4_cp.Sharding.dense(...)`, `Sharding.documents(...)`)."""

    @staticmethod
    def dense(seq_len: int, world_size: int, layout: str | Layout = "zigzag") -> DenseSharding:
        layout = get_layout(layout) if isinstance(layout, str) else layout
        layout.check_length(seq_len, world_size, "seq_len")
        return DenseSharding(layout, world_size, (seq_len,))

    @staticmethod
    def documents(
        doc_lengths: Sequence[int], world_size: int, layout: str | Layout = "balanced", ulysses: int = 1,
    ) -> DocumentSharding | BalancedSharding:
        """Packed documents over a ring of `world_size` ranks: "balanced" (the default: each document
        on a span of ranks of its own, see placement.py; priced at a ring rank's heads under a
        `ulysses`-way split of the mesh whose ring this is), or "zigzag" / "contiguous", every
        document cut over all ranks."""
        if isinstance(layout, str) and check_document_layout(layout) == "balanced":
            return balanced_sharding(tuple(int(n) for n in doc_lengths), world_size, placement_heads(ulysses))
        layout = get_layout(layout) if isinstance(layout, str) else layout
        return DocumentSharding(layout, world_size, tuple(int(n) for n in doc_lengths))
