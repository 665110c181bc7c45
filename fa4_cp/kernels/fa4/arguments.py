"""Launch arguments the forward and backward kernels share."""

from __future__ import annotations

import math

import torch
from flash_attn.cute.utils import AuxData

from ..interface import VarlenRows

NO_AUX = AuxData(None, None)
"""No score-mod auxiliary tensors (immutable, so one instance serves every launch)."""


def varlen_arguments(varlen: VarlenRows | None) -> tuple:
    """cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k as FA4's kernels take them: the block's
    computed sequences alone (VarlenRows.computed_prefix)."""
    if varlen is None:
        return (None, None, None, None)
    launched = varlen.computed_prefix
    return launched.cu_seqlens_q, launched.cu_seqlens_k, launched.seqused_q, launched.seqused_k


def kv_rows_past_k(varlen: VarlenRows | None, k: torch.Tensor) -> int | None:
    """The kv rows a varlen launch's entries select in total where that exceeds k's rows (entries
    over shared KV rows, `VarlenRows.shared_kv_rows`), else None: upstream's varlen backward
    sizes its grid by k's rows, so such a launch needs a grid of its own."""
    rows = None if varlen is None else varlen.shared_kv_rows
    return rows if rows is not None and rows > k.shape[-3] else None


def turn_counters(q: torch.Tensor, k: torch.Tensor, varlen: VarlenRows | None, tile_m: int, tile_n: int, ctas: int = 1) -> tuple:
    """A deterministic backward launch's turn counters, as upstream's kernels take them, zeroed in
    one allocation: dq (b, h, m blocks, `ctas` a tile), dK and dV (b, h_kv, n blocks, 2), the n
    blocks a whole number of `ctas`. For varlen, b is the sequences launched, and the blocks bound
    the longest sequence by the total rows."""
    lead = (len(varlen.computed_prefix.seqused_q),) if varlen is not None else q.shape[:1]
    m_blocks, n_blocks = -(-q.shape[-3] // tile_m), -(-k.shape[-3] // (tile_n * ctas)) * ctas
    shapes = ((*lead, q.shape[-2], m_blocks, ctas), (*lead, k.shape[-2], n_blocks, 2), (*lead, k.shape[-2], n_blocks, 2))
    sizes = [math.prod(shape) for shape in shapes]
    counters = torch.zeros(sum(sizes), dtype=torch.int32, device=q.device)
    return tuple(part.view(shape) for part, shape in zip(counters.split(sizes), shapes))
