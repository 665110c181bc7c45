"""Layouts: which chunks of each sequence a rank holds.

A sequence (or each packed document) is cut into `num_chunks` equal chunks; rank r holds the
chunks `chunks_of(r)`, in increasing order, back to back. Each held chunk is a "lane".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout(ABC):
    name: str

    @abstractmethod
    def num_chunks(self, world_size: int) -> int: ...

    @abstractmethod
    def chunks_of(self, rank: int, world_size: int) -> tuple[int, ...]:
        """The chunk indices rank holds, increasing, so local order follows global order."""

    def check_length(self, seq_len: int, world_size: int, argument: str, *, local_len: int | None = None) -> None:
        """The one length rule of a dense sequence: a positive multiple of the chunk count.
        ValueError naming `argument`; with `local_len`, the message speaks of the caller's local
        length (a rank holds `local_len` = seq_len / world_size)."""
        chunks = self.num_chunks(world_size)
        if seq_len > 0 and seq_len % chunks == 0:
            return
        if local_len is None:
            raise ValueError(
                f"{argument}: the {self.name} layout over {world_size} ranks cuts the sequence into {chunks} chunks, "
                f"so the global length must be a positive multiple of {chunks}; got {seq_len}"
            )
        raise ValueError(
            f"{argument}: the {self.name} layout over {world_size} ranks needs a global sequence length divisible by "
            f"{chunks}, so a local length divisible by {chunks // world_size}; got {local_len}"
        )


@dataclass(frozen=True)
class Zigzag(Layout):
    """Head-tail: rank r holds chunks r and 2W-1-r of 2W, balancing causal work.

    Identical to torch's context-parallel head-tail load balancer.
    """

    name: str = "zigzag"

    def num_chunks(self, world_size: int) -> int:
        return 2 * world_size

    def chunks_of(self, rank: int, world_size: int) -> tuple[int, ...]:
        return (rank, 2 * world_size - 1 - rank)


@dataclass(frozen=True)
class Contiguous(Layout):
    """Rank r holds chunk r of W: balanced for non-causal attention."""

    name: str = "contiguous"

    def num_chunks(self, world_size: int) -> int:
        return world_size

    def chunks_of(self, rank: int, world_size: int) -> tuple[int, ...]:
        return (rank,)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (Zigzag(), Contiguous())}
DOCUMENT_LAYOUTS = ("balanced", *LAYOUTS)
"""Packed documents: kept whole or split ("balanced", placement.py), or each cut on its own."""


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]


def check_document_layout(name: str) -> str:
    if name not in DOCUMENT_LAYOUTS:
        raise ValueError(f"layout: expected one of {list(DOCUMENT_LAYOUTS)} for packed documents, got {name!r}")
    return name
