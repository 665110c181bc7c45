"""dK and dV of a ring call finished in one CuTe-DSL pass: the local sums plus the partial sums
that travelled home (one or two chains, over k's first rows), dK scaled into its units, both
rounded once to k's dtype, into two new tensors.

In torch this is up to four passes over fp32 buffers (the chains' sum, its add into the local
sums, the scale, the conversions). The caller's tensors are viewed as (2, batch, rows, heads *
head_dim); each thread takes `PER_THREAD` values of one (batch, dK or dV), a CTA's threads
neighbours, so that rows of any width read coalesced and a CTA has work however narrow the row.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32
from flash_attn.cute.interface import torch2cute_dtype_map
from quack.compile_utils import make_fake_tensor

from .compile_cache import kernel_cache

THREADS = 128
PER_THREAD = 8
MAX_TRAVELLED = 2  # the two chains of partial sums (runtime/travelling.py)
_compiled = kernel_cache("dkv_finish")


class FinishDkv:
    def __init__(self, has_local: bool, travelled: int):
        self.has_local, self.travelled = has_local, travelled

    @cute.jit
    def __call__(self, mLocal: cute.Tensor, mPart0: cute.Tensor, mPart1: cute.Tensor, mDk: cute.Tensor, mDv: cute.Tensor,
                 dk_scale: Float32, stream):
        # sums (2, batch, rows, width), the parts' rows the travelled ones (the first); mDk, mDv
        # (batch, rows, width): two tensors, as autograd wants outputs that share no storage
        self.kernel(mLocal, mPart0, mPart1, mDk, mDv, dk_scale).launch(
            grid=[cute.ceil_div(mDk.shape[1] * mDk.shape[2], THREADS * PER_THREAD), mDk.shape[0], 2],
            block=[THREADS, 1, 1], stream=stream,
        )

    @cute.kernel
    def kernel(self, mLocal: cute.Tensor, mPart0: cute.Tensor, mPart1: cute.Tensor, mDk: cute.Tensor, mDv: cute.Tensor,
               dk_scale: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        block, batch, which = cute.arch.block_idx()
        rows, width = mDk.shape[1], mDk.shape[2]
        for i in cutlass.range_constexpr(PER_THREAD):
            index = (block * PER_THREAD + i) * THREADS + tidx
            if index < rows * width:
                row = index // width
                col = index % width
                value = Float32(0.0)
                if cutlass.const_expr(self.has_local):
                    value = mLocal[which, batch, row, col]
                if cutlass.const_expr(self.travelled > 0):
                    if row < mPart0.shape[2]:
                        value = value + mPart0[which, batch, row, col]
                        if cutlass.const_expr(self.travelled > 1):
                            value = value + mPart1[which, batch, row, col]
                if which == 0:
                    mDk[batch, row, col] = (value * dk_scale).to(mDk.element_type)
                else:
                    mDv[batch, row, col] = value.to(mDv.element_type)


def finish_dkv_cuda(local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, dk_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """local: (2, *k.shape) fp32 or None; travelled: (2, ..., rows, h, d) fp32 sums over k's first
    rows. Returns (dK * dk_scale, dV) as new tensors of k's dtype."""
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    if local is None and not travelled:
        return dk.zero_(), dv.zero_()
    if k[0].numel() >= 2**31:
        raise ValueError(f"dK/dV finish: a batch entry of k holds {k[0].numel()} values, the kernel indexes below 2**31")
    if len(travelled) > MAX_TRAVELLED:
        raise ValueError(f"dK/dV finish: at most {MAX_TRAVELLED} travelled sums, got {len(travelled)}")
    key = (str(k.dtype), local is not None, len(travelled))
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[k.dtype], local is not None, len(travelled))
    views = [_rows_view(t) for t in travelled]
    local_view = _rows_view(local) if local is not None else views[0]  # unread without local sums
    parts = views + [local_view] * (MAX_TRAVELLED - len(views))  # placeholders the kernel never reads
    _compiled[key](local_view, *parts, _rows_view(dk[None])[0], _rows_view(dv[None])[0], dk_scale)
    return dk, dv


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(2, [batch,] rows, heads, head_dim) -> (2, batch, rows, heads * head_dim)."""
    if t.dim() == 4:  # varlen
        t = t.unsqueeze(1)
    return t.flatten(-2)


def _compile(dtype, has_local: bool, travelled: int):
    sym = cute.sym_int
    batch, rows, width = sym(), sym(), sym()
    local = make_fake_tensor(Float32, (2, batch, sym(), width))  # dK's rows; a placeholder's differ
    parts = [make_fake_tensor(Float32, (2, batch, sym(), width)) for _ in range(MAX_TRAVELLED)]
    dk, dv = (make_fake_tensor(dtype, (batch, rows, width)) for _ in range(2))
    return cute.compile(
        FinishDkv(has_local, travelled), local, *parts, dk, dv, Float32(1.0),
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
