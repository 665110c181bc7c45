"""FA4's Hopper forward, extended so that its epilogue merges each tile into LSE partials.

The O and LSE tensors the kernel receives are the ring's accumulators: out in fp32, lse in fp64.
With `accumulate`, the epilogue reads the prior (out, lse) of its rows, merges the tile's
normalized output and LSE into them in registers (the LSE in fp64), and writes them back; a row
whose prior lse is -inf takes the tile's result without reading out, so out need not start
zeroed. Without `accumulate`, it writes the tile's result. Every other part of the kernel is upstream's.

With `pack_gqa` (upstream's layout: the q heads of a KV head folded into the rows, packed row i
of a tile being q head i % g of token i // g, g q heads per KV head), a tile's rows are viewed
through that fold, so the merge reads and writes each row's own (token, head) of the accumulators.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Float64, const_expr
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.named_barrier import NamedBarrierFwd
from flash_attn.cute.utils import elem_pointer
from quack import layout_utils

from .lse_merge import merged_lse_and_weights
from .vector_memory import prefetch_l2

# A thread's values of an MMA row are pairs of adjacent columns 8 apart: 8 of them span 32 fp32
# columns, one 128-byte line
VALUES_PER_LINE = 8


class PartialsForwardSm90(FlashAttentionForwardSm90):
    def __init__(self, *args, accumulate: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulate = accumulate
        if self.check_hdim_v_oob:
            raise ValueError("PartialsForwardSm90 needs a head_dim_v multiple of 16")
        if self.pack_gqa and self.tile_m % self.qhead_per_kvhead:
            raise ValueError(f"pack_gqa: {self.qhead_per_kvhead} q heads per KV head do not divide the {self.tile_m}-row tile")

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
        mO_cur = seqlen.offset_batch_Q(mO, batch_idx, dim=3)[None, None, head_idx]
        mLSE_cur = seqlen.offset_batch_Q(mLSE, batch_idx, dim=2)[None, head_idx]
        if const_expr(not self.pack_gqa):
            gO = cute.local_tile(mO_cur, (self.tile_m, self.tile_hdimv), (m_block, 0))
            gLSE = cute.local_tile(mLSE_cur, (self.tile_m,), (m_block,))
            rows_in_tile = seqlen.seqlen_q - m_block * self.tile_m
        else:  # head_idx is the KV head; the tile's rows are (q head, token) pairs
            gO = self._packed_tile(mO_cur, m_block, (0,), (self.tile_hdimv,))
            gLSE = self._packed_tile(mLSE_cur, m_block, (), ())
            rows_in_tile = seqlen.seqlen_q * self.qhead_per_kvhead - m_block * self.tile_m
        tOgO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(gO))
        tOrO = layout_utils.reshape_acc_to_mn(acc_O)
        tOcO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_hdimv))))
        num_rows = cute.size(tOrO, mode=[0])
        num_cols = cute.size(tOrO, mode=[1])

        if const_expr(self.accumulate and not self.pack_gqa):
            # The prior out that the rows below read, one at a time after the lse: asked of L2
            # first, so those reads wait on L2 and not on memory. One q head per tile's rows only:
            # at 8K, d 128 (H100, bench/results/nvidia_h100_2026-12-06_s19/) it took the merging
            # step from 0.950-0.959 to 0.965-0.966x upstream at 32:32, but packed q heads (32:8)
            # lost 3.6% causal, 0.931 to 0.895x
            for m in cutlass.range(num_rows, unroll_full=True):
                if tOcO[m, 0][0] < rows_in_tile:
                    for n in cutlass.range(0, num_cols, VALUES_PER_LINE, unroll_full=True):
                        prefetch_l2(elem_pointer(gO, tOcO[m, n]))
        lse_prior = cute.make_rmem_tensor_like(lse, Float64)
        for m in cutlass.range(num_rows, unroll_full=True):
            lse_prior[m] = -Float64.inf
            if const_expr(self.accumulate):
                if tOcO[m, 0][0] < rows_in_tile:
                    lse_prior[m] = gLSE[tOcO[m, 0][0]]
        # The four threads of a row all read its prior lse before one of them overwrites it.
        cute.arch.barrier(barrier_id=int(NamedBarrierFwd.Epilogue), number_of_threads=self.num_epilogue_threads)

        # A row's out moves between registers and memory in vectors (autovec_copy: the MMA
        # layout's column pairs, 8 bytes a thread), not one fp32 at a time.
        merged = cute.make_rmem_tensor_like(tOrO[0, None], Float32)
        prior = cute.make_rmem_tensor_like(tOrO[0, None], Float32)
        for m in cutlass.range(num_rows, unroll_full=True):
            row = tOcO[m, 0][0]
            if row < rows_in_tile:
                lse_new, weight_prior, weight_tile = merged_lse_and_weights(lse_prior[m], Float64(lse[m]))
                for n in cutlass.range(num_cols, unroll_full=True):
                    merged[n] = tOrO[m, n] * weight_tile
                if const_expr(self.accumulate):
                    # No key merged into this row yet: its out is not read, so it may be unset.
                    if lse_prior[m] != -Float64.inf:
                        cute.autovec_copy(tOgO[m, None], prior)
                        for n in cutlass.range(num_cols, unroll_full=True):
                            merged[n] = prior[n] * weight_prior + merged[n]
                cute.autovec_copy(merged, tOgO[m, None])
                if tOcO[m, 0][1] == 0:
                    gLSE[row] = lse_new

    @cute.jit
    def _packed_tile(self, packed: cute.Tensor, m_block: cutlass.Int32, rest_origin: tuple, rest_shape: tuple) -> cute.Tensor:
        """Tile m_block of a tensor whose first mode is upstream's fold (q heads, tokens): the
        tile_m rows as (q heads, tile_m / q heads tokens), the other modes of `rest_shape`."""
        tokens = self.tile_m // self.qhead_per_kvhead
        origin = cute.domain_offset(((0, m_block * tokens), *rest_origin), packed)
        layout = cute.make_layout(((self.qhead_per_kvhead, tokens), *rest_shape), stride=origin.stride)
        return cute.make_tensor(origin.iterator, layout)
