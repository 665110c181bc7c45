"""Blackwell (sm100): upstream FA4's own kernels, with the ring's merge in a kernel of ours.

UNTESTED: this project's machines are Hoppers, so nothing here has run. It sits behind the same
GPU tests as the Hopper path (they select the FA4 backend on any sm90/sm100 device), which run
wherever a B200 or GB200 is.

Forward: upstream's plain forward (16-bit out, fp32 lse), then `merge_partials_cuda` folds it
into the accumulators. Backward, where the accumulating kernel does not run (head_dim 256:
backward_pass_sm100.py): upstream's backward per step from the final
(out, lse); its dq, dk, dv partials are added in fp32. Delta and the dq layout are upstream's per
call here.
"""

from __future__ import annotations

import torch
from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

from ..dkv_sum import TorchFinishedGradients
from ..interface import BandMask, VarlenRows, check_fixed_order
from .arguments import kv_rows_past_k
from .masks import block_window
from .merge_kernel import merge_partials_cuda


def _varlen_kwargs(varlen: VarlenRows | None) -> dict:
    """Upstream's varlen arguments: the block's computed sequences alone (VarlenRows.computed_prefix)."""
    if varlen is None:
        return {}
    launched = varlen.computed_prefix
    return dict(
        cu_seqlens_q=launched.cu_seqlens_q, cu_seqlens_k=launched.cu_seqlens_k,
        seqused_q=launched.seqused_q, seqused_k=launched.seqused_k,
    )


class MergeAfterForwardPass:
    """`ForwardPass` over upstream's forward, each step's result merged by our merge kernel (the
    Blackwell path, and the Hopper baseline for the fused epilogue)."""

    writes_rounded_varlen = False  # upstream's varlen forward writing 16-bit rows: not yet run on a Blackwell GPU

    def __init__(self, softmax_scale: float, softcap: float | None = None):
        self.softmax_scale, self.softcap = softmax_scale, softcap

    def step(
        self, q, k, v, out_acc, lse_acc, *, mask: BandMask, accumulate: bool, varlen: VarlenRows | None = None,
        write_rounded: bool = False,
    ) -> None:
        if q.shape[-3] == 0 or k.shape[-3] == 0:
            return
        window = block_window(mask, q, k, varlen)
        if write_rounded:  # its rows have no other block: upstream's forward writes the 16-bit out and fp32 lse itself
            out, lse = out_acc, lse_acc
        else:  # upstream leaves the lse of rows outside a varlen call's sequences unset; the merge reads -inf as "no key"
            unset = None if varlen is None else torch.full((q.shape[-2], q.shape[-3]), float("-inf"), dtype=torch.float32, device=q.device)
            out, lse = None, unset
        out, lse, *_ = _flash_attn_fwd(
            q, k, v, softmax_scale=self.softmax_scale, softcap=self.softcap, causal=window.causal,
            window_size_left=window.left, window_size_right=window.right, return_lse=True, out=out, lse=lse, **_varlen_kwargs(varlen),
        )
        if write_rounded:
            return
        if accumulate:
            merge_partials_cuda(out, lse, out_acc, lse_acc)
        else:
            out_acc.copy_(out)
            lse_acc.copy_(lse)


class UpstreamBackwardPass(TorchFinishedGradients):
    """`BackwardPass` over upstream's backward, one full call per step."""

    def __init__(self, q, out, lse, dout, dlse, softmax_scale: float, softcap: float | None = None, deterministic: bool = False):
        self.q, self.out, self.dout, self.softmax_scale, self.deterministic = q, out, dout, softmax_scale, deterministic
        self.softcap = 0.0 if softcap is None else softcap  # upstream's backward: 0.0 is no cap
        self.lse = lse.float()
        self.dlse = None if dlse is None else dlse.float()
        self.dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)

    def step(self, k, v, dk_acc, dv_acc, *, q_rows: slice, mask: BandMask, varlen: VarlenRows | None = None, write_first: bool = False) -> None:
        if write_first and varlen is not None:
            raise ValueError("write_first: dense blocks only")
        check_fixed_order(varlen, self.deterministic)
        if kv_rows_past_k(varlen, k) is not None:
            raise ValueError("varlen entries whose KV rows exceed k's in total: upstream's Blackwell backward covers k's rows once")
        q, out, dout = (t[..., q_rows, :, :] for t in (self.q, self.out, self.dout))
        window = block_window(mask, q, k, varlen)
        dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
        _flash_attn_bwd(
            q, k, v, out, dout, self.lse[..., q_rows], softmax_scale=self.softmax_scale, softcap=self.softcap, causal=window.causal,
            window_size_left=window.left, window_size_right=window.right, dq=dq, dk=dk, dv=dv,
            dlse=None if self.dlse is None else self.dlse[..., q_rows], deterministic=self.deterministic, **_varlen_kwargs(varlen),
        )
        self.dq_acc[..., q_rows, :, :] += dq
        if write_first:
            dk_acc.copy_(dk)
            dv_acc.copy_(dv)
        else:
            dk_acc += dk
            dv_acc += dv
