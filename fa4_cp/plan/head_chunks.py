"""How a 2-D call cuts each ulysses rank's heads into chunks, so that one chunk's all-to-all runs
behind the previous chunk's ring (runtime/ulysses.py).

Chunk j takes q heads [j * q_heads, (j + 1) * q_heads) of the rank's head group, and reads KV
chunk j // (count // kv_count): every chunk lies within the heads of the KV heads it reads. With
fewer KV heads than chunks, consecutive chunks share one KV head; its KV travels with the first of
them, and its dK/dV is summed over them before it travels back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadChunks:
    count: int
    q_heads: int
    """q heads per chunk."""
    kv_count: int
    kv_heads: int
    """KV heads per KV chunk."""

    @classmethod
    def of(cls, head_group: int, kv_group: int, count: int) -> HeadChunks:
        """The chunks of a rank holding `head_group` q heads and `kv_group` KV heads; ValueError
        naming `ulysses_chunks` where they cannot split that way."""
        if head_group % count:
            raise ValueError(f"ulysses_chunks: {count} chunks do not split the {head_group} q heads of each ulysses rank")
        kv_count = min(count, kv_group)
        if kv_group % kv_count or count % kv_count:
            raise ValueError(
                f"ulysses_chunks: {count} chunks over {kv_group} KV heads per ulysses rank: expected a multiple or a divisor of {kv_group}"
            )
        return cls(count, head_group // count, kv_count, kv_group // kv_count)

    @property
    def per_kv(self) -> int:
        """Consecutive chunks that read one KV chunk."""
        return self.count // self.kv_count

    def kv_of(self, chunk: int) -> int:
        return chunk // self.per_kv

    def brings_kv(self, chunk: int) -> bool:
        """Whether `chunk` is the first to read its KV chunk (its KV travels with it)."""
        return chunk % self.per_kv == 0

    def finishes_kv(self, chunk: int) -> bool:
        """Whether `chunk` is the last to read its KV chunk (its dK/dV is then whole)."""
        return (chunk + 1) % self.per_kv == 0
