"""Launch arguments the forward and backward kernels share."""

from __future__ import annotations

from flash_attn.cute.utils import AuxData

from ..interface import VarlenRows

NO_AUX = AuxData(None, None)
"""No score-mod auxiliary tensors (immutable, so one instance serves every launch)."""


def varlen_arguments(varlen: VarlenRows | None) -> tuple:
    """cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k as FA4's kernels take them."""
    if varlen is None:
        return (None, None, None, None)
    return varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.seqused_q, varlen.seqused_k
