"""FA4's Hopper forward, extended so that its epilogue merges each tile into LSE partials.

The O and LSE tensors the kernel receives are the ring's accumulators: out in fp32, lse in fp64.
With `accumulate`, the epilogue reads the prior (out, lse) of its rows, merges the tile's
normalized output and LSE into them in registers (the LSE in fp64), and writes them back; a row
whose prior lse is -inf takes the tile's result without reading out, so out need not start
zeroed. Without `accumulate`, it writes the tile's result. Every other part of the kernel is upstream's.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Float64, const_expr
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.named_barrier import NamedBarrierFwd
from quack import layout_utils

from .lse_merge import merged_lse_and_weights


class PartialsForwardSm90(FlashAttentionForwardSm90):
    def __init__(self, *args, accumulate: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulate = accumulate
        if self.pack_gqa or self.check_hdim_v_oob:
            raise ValueError("PartialsForwardSm90 needs pack_gqa=False and a head_dim_v multiple of 16")

    # Upstream stores O through a 16-bit shared-memory tile and TMA; the fp32 accumulator is
    # read and written from registers instead, so the TMA store stays off whatever __call__ sets.
    @property
    def use_tma_O(self) -> bool:
        return False

    @use_tma_O.setter
    def use_tma_O(self, value: bool) -> None:
        pass

    def _check_type(self, mQ_type, mK_type, mV_type, mO_type, mLSE_type, *varlen_types):
        if const_expr(mO_type != Float32 or mLSE_type != Float64):
            raise TypeError("the out accumulator must be Float32 and the lse accumulator Float64")
        super()._check_type(mQ_type, mK_type, mV_type, mQ_type, Float32, *varlen_types)

    @cute.jit
    def epilogue(
        self,
        acc_O: cute.Tensor,
        lse: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,  # Float64
        sO: cute.Tensor,
        seqlen,
        gmem_tiled_copy_O: cute.TiledCopy,
        tma_atom_O,
        tiled_mma: cute.TiledMma,
        tidx: cutlass.Int32,
        m_block: cutlass.Int32,
        head_idx: cutlass.Int32,
        batch_idx: cutlass.Int32,
    ):
        thr_mma = tiled_mma.get_slice(tidx)
        gO = cute.local_tile(
            seqlen.offset_batch_Q(mO, batch_idx, dim=3)[None, None, head_idx],
            (self.tile_m, self.tile_hdimv),
            (m_block, 0),
        )
        gLSE = cute.local_tile(seqlen.offset_batch_Q(mLSE, batch_idx, dim=2)[None, head_idx], (self.tile_m,), (m_block,))
        tOgO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(gO))
        tOrO = layout_utils.reshape_acc_to_mn(acc_O)
        tOcO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_hdimv))))
        rows_in_tile = seqlen.seqlen_q - m_block * self.tile_m
        num_rows = cute.size(tOrO, mode=[0])
        num_cols = cute.size(tOrO, mode=[1])

        lse_prior = cute.make_rmem_tensor_like(lse, Float64)
        for m in cutlass.range(num_rows, unroll_full=True):
            lse_prior[m] = -Float64.inf
            if const_expr(self.accumulate):
                if tOcO[m, 0][0] < rows_in_tile:
                    lse_prior[m] = gLSE[tOcO[m, 0][0]]
        # The four threads of a row all read its prior lse before one of them overwrites it.
        cute.arch.barrier(barrier_id=int(NamedBarrierFwd.Epilogue), number_of_threads=self.num_epilogue_threads)

        for m in cutlass.range(num_rows, unroll_full=True):
            row = tOcO[m, 0][0]
            if row < rows_in_tile:
                lse_new, weight_prior, weight_tile = merged_lse_and_weights(lse_prior[m], Float64(lse[m]))
                if const_expr(self.accumulate):
                    if lse_prior[m] == -Float64.inf:
                        # No key merged into this row yet: its out is not read, so it may be unset.
                        for n in cutlass.range(num_cols, unroll_full=True):
                            tOgO[m, n] = tOrO[m, n] * weight_tile
                    else:
                        for n in cutlass.range(num_cols, unroll_full=True):
                            tOgO[m, n] = tOgO[m, n] * weight_prior + tOrO[m, n] * weight_tile
                else:
                    for n in cutlass.range(num_cols, unroll_full=True):
                        tOgO[m, n] = tOrO[m, n] * weight_tile
                if tOcO[m, 0][1] == 0:
                    gLSE[row] = lse_new
