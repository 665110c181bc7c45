"""Launch arguments the forward and backward kernels share."""

from __future__ import annotations

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
