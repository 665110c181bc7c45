"""Varlen dq read-back in one pass: the tiled fp32 accumulators of up to three q sides, summed,
scaled and rounded once into dq (total, h, d) of q's dtype.

A packed-document call keeps one FA4 dq accumulator per run of q lanes (backward_pass_sm90.py). Reading them
back with torch (un-tile, gather the selected rows, index_add, scale, round) passes over every
accumulator five times; this kernel reads each once. One warp per (head, row), rows fastest so
that neighbouring warps gather from the same accumulator tiles: for each side whose row map
selects the row, every lane adds its columns from their places in the tile (`order`, the
permutation tiled_accumulator.py reads off upstream's postprocess), then writes them scaled.
Rows that no side selects are written as zeros.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from flash_attn.cute.interface import torch2cute_dtype_map
from quack.compile_utils import make_fake_tensor

from .compile_cache import kernel_cache
from .tiled_accumulator import TileGeometry

MAX_SIDES = 3  # the planners' runs of q lanes: both lanes, the first, the second
WARPS_PER_CTA = 8
_compiled = kernel_cache("dq_readback")


class DqReadback:
    def __init__(self, geometry: TileGeometry, sides: int):
        if geometry.head_dim % 32 or not 1 <= sides <= MAX_SIDES:
            raise ValueError(f"dq read-back: head_dim a multiple of 32 and 1..{MAX_SIDES} sides, got {geometry.head_dim}, {sides}")
        self.tile, self.head_dim, self.sides = geometry.tile, geometry.head_dim, sides
        self.tile_storage = geometry.tile * geometry.head_dim_rounded

    @cute.jit
    def __call__(self, mAccum0: cute.Tensor, mAccum1: cute.Tensor, mAccum2: cute.Tensor, mRows: cute.Tensor,
                 mOrder: cute.Tensor, mDq: cute.Tensor, scale: Float32, stream):
        # mAccum*: (h, padded rows * head_dim_rounded) fp32; mRows: (sides, total) int32, the padded
        # row of each row or -1; mOrder: (tile * head_dim,) int32; mDq: (total, h, d)
        warps = cute.size(mDq.shape[0]) * cute.size(mDq.shape[1])
        self.kernel(mAccum0, mAccum1, mAccum2, mRows, mOrder, mDq, scale).launch(
            grid=[cute.ceil_div(warps, WARPS_PER_CTA), 1, 1], block=[WARPS_PER_CTA * 32, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mAccum0: cute.Tensor, mAccum1: cute.Tensor, mAccum2: cute.Tensor, mRows: cute.Tensor,
               mOrder: cute.Tensor, mDq: cute.Tensor, scale: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        block, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = block * WARPS_PER_CTA + tidx // 32
        total = mDq.shape[0]
        if warp < total * mDq.shape[1]:
            head = warp // total
            row = warp % total
            accumulators = (mAccum0, mAccum1, mAccum2)
            values = cute.make_rmem_tensor((self.head_dim // 32,), Float32)
            values.fill(0.0)
            for side in cutlass.range_constexpr(self.sides):
                padded = Int32(mRows[side, row])
                if padded >= 0:
                    tile_start = (padded // self.tile) * self.tile_storage
                    in_tile = (padded % self.tile) * self.head_dim
                    for i in cutlass.range_constexpr(self.head_dim // 32):
                        place = tile_start + mOrder[in_tile + lane + 32 * i]
                        values[i] = values[i] + accumulators[side][head, place]
            for i in cutlass.range_constexpr(self.head_dim // 32):
                mDq[row, head, lane + 32 * i] = (values[i] * scale).to(mDq.element_type)


def read_back_dq(accumulators: list[torch.Tensor], row_maps: torch.Tensor, order: torch.Tensor, geometry: TileGeometry,
                 scale: float, dq: torch.Tensor) -> None:
    """dq[row] = scale * sum of each side's accumulator at row_maps[side, row] (where >= 0)."""
    sides = len(accumulators)
    key = (str(dq.dtype), geometry.tile, geometry.head_dim, geometry.head_dim_rounded, sides)
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[dq.dtype], geometry, sides)
    padded = accumulators + [accumulators[0]] * (MAX_SIDES - sides)  # the kernel reads only the first `sides`
    _compiled[key](*padded, row_maps, order, dq, scale)


def _compile(dtype, geometry: TileGeometry, sides: int):
    sym = cute.sym_int
    heads, total = sym(), sym()
    accumulators = [make_fake_tensor(Float32, (heads, sym())) for _ in range(MAX_SIDES)]
    row_maps = make_fake_tensor(Int32, (sides, total))
    order = make_fake_tensor(Int32, (geometry.tile * geometry.head_dim,))
    dq = make_fake_tensor(dtype, (total, heads, geometry.head_dim))
    return cute.compile(
        DqReadback(geometry, sides), *accumulators, row_maps, order, dq, Float32(1.0),
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
