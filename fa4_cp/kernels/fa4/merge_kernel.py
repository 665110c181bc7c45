"""Stand-alone CuTe-DSL merge: fold one step's (out, lse) into the fp32/fp64 accumulators in place.

The fallback and baseline for the merge fused into the Hopper forward's epilogue, and the merge
of the Blackwell path, whose forward is upstream's plain kernel. One warp per (row, head): it
reads the step's lse and the running lse (fp64), merges them, rescales and adds the step's
16-bit output into the fp32 accumulator, each lane a run of head_dim / 32 neighbouring values
read and written as vectors, and one lane writes the new lse. Rows whose step lse
is -inf (no visible key, or not selected by a varlen call) keep their (out, lse), out set to 0
where no key has been merged yet: the accumulator's out is never read while its lse is -inf, so
it need not start zeroed.
"""

from __future__ import annotations

import cutlass.cute as cute
import torch
from cutlass import Float32, Float64
from flash_attn.cute.interface import torch2cute_dtype_map
from quack.compile_utils import make_fake_tensor

from .compile_cache import kernel_cache
from .lse_merge import merged_lse_and_weights

WARPS_PER_CTA = 4
_compiled = kernel_cache("merge")


class MergePartials:
    def __init__(self, head_dim: int):
        if head_dim % 32:
            raise ValueError(f"head_dim: the merge kernel needs a multiple of 32, got {head_dim}")
        self.head_dim, self.run = head_dim, head_dim // 32

    @cute.jit
    def __call__(self, mOut: cute.Tensor, mLse: cute.Tensor, mOutAcc: cute.Tensor, mLseAcc: cute.Tensor, stream):
        # mOut, mOutAcc: (b, s, h, d); mLse, mLseAcc: (b, h, s)
        rows = cute.size(mOut.shape[0]) * cute.size(mOut.shape[1]) * cute.size(mOut.shape[2])
        self.kernel(mOut, mLse, mOutAcc, mLseAcc).launch(
            grid=[cute.ceil_div(rows, WARPS_PER_CTA), 1, 1], block=[WARPS_PER_CTA * 32, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mOut: cute.Tensor, mLse: cute.Tensor, mOutAcc: cute.Tensor, mLseAcc: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        block, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        row = block * WARPS_PER_CTA + tidx // 32
        seqlen, heads = mOut.shape[1], mOut.shape[2]
        if row < cute.size(mOut.shape[0]) * seqlen * heads:
            head = row % heads
            token = (row // heads) % seqlen
            batch = row // (heads * seqlen)
            lse_step = Float64(mLse[batch, head, token])
            lse_prior = Float64(mLseAcc[batch, head, token])
            # this lane's run of the row: read and written as vectors, not one value at a time
            acc = cute.local_tile(mOutAcc[batch, token, head, None], (self.run,), (lane,))
            merged = cute.make_rmem_tensor((self.run,), Float32)
            if lse_step != -Float64.inf:
                lse_new, weight_prior, weight_step = merged_lse_and_weights(lse_prior, lse_step)
                step = cute.make_rmem_tensor((self.run,), mOut.element_type)
                cute.autovec_copy(cute.local_tile(mOut[batch, token, head, None], (self.run,), (lane,)), step)
                merged.store(step.load().to(Float32) * weight_step)
                if lse_prior != -Float64.inf:  # else nothing merged yet: the accumulator is not read
                    prior = cute.make_rmem_tensor((self.run,), Float32)
                    cute.autovec_copy(acc, prior)
                    merged.store(prior.load() * weight_prior + merged.load())
                cute.autovec_copy(merged, acc)
                # Every lane has read the prior lse before lane 0 replaces it.
                cute.arch.sync_warp()
                if lane == 0:
                    mLseAcc[batch, head, token] = lse_new
            else:
                if lse_prior == -Float64.inf:  # a row that has seen no key so far holds out = 0
                    merged.fill(0.0)
                    cute.autovec_copy(merged, acc)


def merge_partials_cuda(out: torch.Tensor, lse: torch.Tensor, out_acc: torch.Tensor, lse_acc: torch.Tensor) -> None:
    """out (b, s, h, d) 16-bit and lse (b, h, s) fp32 of one step, merged into out_acc (fp32) and
    lse_acc (fp64) of the same shapes; varlen (total, h, d) / (h, total) tensors work as a batch of one."""
    if out.dim() == 3:
        out, lse, out_acc, lse_acc = out[None], lse[None], out_acc[None], lse_acc[None]
    key = (str(out.dtype), out.shape[-1])
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[out.dtype], out.shape[-1])
    _compiled[key](out, lse, out_acc, lse_acc)


def _compile(dtype, head_dim: int):
    sym = cute.sym_int
    batch, seqlen, heads = sym(), sym(), sym()
    run = head_dim // 32
    aligned = run & -run  # rows start at a multiple of a lane's run, as far as a power of two can say
    out = make_fake_tensor(dtype, (batch, seqlen, heads, head_dim), divisibility=aligned)
    out_acc = make_fake_tensor(Float32, (batch, seqlen, heads, head_dim), divisibility=aligned)
    lse = make_fake_tensor(Float32, (batch, heads, seqlen))
    lse_acc = make_fake_tensor(Float64, (batch, heads, seqlen))
    return cute.compile(
        MergePartials(head_dim), out, lse, out_acc, lse_acc,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
