"""BandMask (top-left, per block) to FlashAttention-4's (causal, window_size_left, window_size_right)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..interface import BandMask, VarlenRows


@dataclass(frozen=True)
class Fa4Window:
    causal: bool
    local: bool
    left: int | None
    right: int | None

    @functools.cached_property
    def kind(self) -> tuple[bool, bool, bool, bool]:
        """What a compiled kernel fixes: causal, local, and which window sides are bounded (the
        sides' sizes are launch arguments)."""
        return self.causal, self.local, self.left is not None, self.right is not None


@functools.lru_cache(maxsize=256)
def fa4_window(mask: BandMask, seqlen_q: int, seqlen_k: int) -> Fa4Window:
    """FA4 aligns windows bottom-right: key j is visible to query i iff
    i + (seqlen_k - seqlen_q) - left <= j <= i + (seqlen_k - seqlen_q) + right.
    Cached: a ring call meets few (mask, shape) pairs."""
    shift = seqlen_k - seqlen_q
    left = None if mask.lo is None else shift - mask.lo
    right = None if mask.hi is None else mask.hi - shift
    if left is None and right is None:
        return Fa4Window(False, False, None, None)
    if left is None and right == 0:
        return Fa4Window(True, False, None, None)
    return Fa4Window(False, True, left, right)


def block_window(mask: BandMask, q: torch.Tensor, k: torch.Tensor, varlen: VarlenRows | None) -> Fa4Window:
    """The FA4 window of one block: dense blocks align on their own lengths, varlen blocks on the
    per-sequence length difference that all their sequences share (`VarlenRows.kv_shift`), or at
    each sequence's end as FA4 does (`VarlenRows.aligned_at_end`)."""
    if varlen is None:
        return fa4_window(mask, q.shape[1], k.shape[1])
    return fa4_window(mask, 0, 0 if varlen.aligned_at_end else varlen.kv_shift)
