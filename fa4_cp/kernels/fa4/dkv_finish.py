"""dK and dV of a ring call finished in one CuTe-DSL pass: the local sums plus the partial sums
that travelled home (one or two chains, over k's first rows), dK scaled into its units, both
rounded once to k's dtype.

In torch this is up to four passes over fp32 buffers (the chains' sum, its add into the local
sums, the scale, the conversions). One CTA per (row, batch, dK or dV) walks the row's heads x
head_dim values; the caller's tensors are viewed as (2, batch, rows, heads * head_dim).
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
MAX_TRAVELLED = 2  # the two chains of partial sums (parallel/travelling.py)
_compiled = kernel_cache("dkv_finish")


class FinishDkv:
    def __init__(self, has_local: bool, travelled: int):
        self.has_local, self.travelled = has_local, travelled

    @cute.jit
    def __call__(self, mLocal: cute.Tensor, mPart0: cute.Tensor, mPart1: cute.Tensor, mOut: cute.Tensor, dk_scale: Float32, stream):
        # all (2, batch, rows, width); the parts' rows are the travelled ones, the first of mOut's
        self.kernel(mLocal, mPart0, mPart1, mOut, dk_scale).launch(
            grid=[mOut.shape[2], mOut.shape[1], 2], block=[THREADS, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mLocal: cute.Tensor, mPart0: cute.Tensor, mPart1: cute.Tensor, mOut: cute.Tensor, dk_scale: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        row, batch, which = cute.arch.block_idx()
        scale = Float32(1.0)
        if which == 0:
            scale = dk_scale
        travelled = row < mPart0.shape[2]
        for col in cutlass.range(tidx, mOut.shape[3], THREADS):
            value = Float32(0.0)
            if cutlass.const_expr(self.has_local):
                value = mLocal[which, batch, row, col]
            if cutlass.const_expr(self.travelled > 0):
                if travelled:
                    value = value + mPart0[which, batch, row, col]
                    if cutlass.const_expr(self.travelled > 1):
                        value = value + mPart1[which, batch, row, col]
            mOut[which, batch, row, col] = (value * scale).to(mOut.element_type)


def finish_dkv_cuda(local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, dk_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """local: (2, *k.shape) fp32 or None; travelled: (2, ..., rows, h, d) fp32 sums over k's first
    rows. Returns (dK * dk_scale, dV) as new tensors of k's dtype."""
    out = torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    if local is None and not travelled:
        return out[0].zero_(), out[1].zero_()
    if len(travelled) > MAX_TRAVELLED:
        raise ValueError(f"dK/dV finish: at most {MAX_TRAVELLED} travelled sums, got {len(travelled)}")
    key = (str(k.dtype), local is not None, len(travelled))
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[k.dtype], local is not None, len(travelled))
    views = [_rows_view(t) for t in travelled]
    local_view = _rows_view(local) if local is not None else views[0]  # unread without local sums
    parts = views + [local_view] * (MAX_TRAVELLED - len(views))  # placeholders the kernel never reads
    _compiled[key](local_view, *parts, _rows_view(out), dk_scale)
    return out[0], out[1]


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(2, [batch,] rows, heads, head_dim) -> (2, batch, rows, heads * head_dim)."""
    if t.dim() == 4:  # varlen
        t = t.unsqueeze(1)
    return t.flatten(-2)


def _compile(dtype, has_local: bool, travelled: int):
    sym = cute.sym_int
    batch, rows, width = sym(), sym(), sym()
    local = make_fake_tensor(Float32, (2, batch, rows, width))
    parts = [make_fake_tensor(Float32, (2, batch, sym(), width)) for _ in range(MAX_TRAVELLED)]
    out = make_fake_tensor(dtype, (2, batch, rows, width))
    return cute.compile(
        FinishDkv(has_local, travelled), local, *parts, out, Float32(1.0),
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
