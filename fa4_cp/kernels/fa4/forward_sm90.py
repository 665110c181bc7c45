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

# The prior out a thread reads with its lse, in fp32 values: all its rows up to head_dim 128 (two
# rows of 32 values), one row at 256, so that they and the tile's out (acc_O) fit the consumer
# warpgroups' registers
PRIOR_VALUES_READ_AT_ONCE = 64
FP32_PER_LINE = 32


def _tile_of(mask_fn) -> dict:
    """The tile (m_block, head_idx, batch_idx) upstream's consumer loop binds into the mask
    function it hands each tile's first block (functools.partial keywords)."""
    bound = getattr(mask_fn, "keywords", {})
    tile = {name: bound.get(name) for name in ("m_block", "head_idx", "batch_idx")}
    if any(value is None for value in tile.values()):
        raise TypeError(f"flash-attn-4's forward no longer binds the tile into the mask function of a tile's first block ({sorted(bound)})")
    return tile


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

    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, *args, **kwargs):
        # The consumer warpgroups' loop (upstream's): the accumulators are kept for the
        # prefetch at each tile's first block
        self._accumulators = (mO, mLSE)
        return super().mma(tiled_mma_qk, tiled_mma_pv, mO, mLSE, *args, **kwargs)

    @cute.jit
    def first_half_block_overlap(self, n_block, mma_qk_fn, kv_consumer_state, pipeline_k, tOrP, smem_copy_params, softmax, seqlen, *args, **kwargs):
        # A tile's prior out and lse, asked of L2 as its first block starts, so that its epilogue
        # reads them from L2 and not from memory, a tile's mainloop later
        if const_expr(self.accumulate):
            self._prefetch_prior(seqlen, **_tile_of(kwargs.get("mask_fn")))
        return super().first_half_block_overlap(
            n_block, mma_qk_fn, kv_consumer_state, pipeline_k, tOrP, smem_copy_params, softmax, seqlen, *args, **kwargs,
        )

    @cute.jit
    def _prefetch_prior(self, seqlen, m_block: cutlass.Int32, head_idx: cutlass.Int32, batch_idx):
        """Every 128-byte line of the tile's prior out, and each row's prior lse, into L2: the
        consumer threads share the lines out."""
        mO, mLSE = self._accumulators
        gO, gLSE, rows_in_tile = self._accumulator_tiles(mO, mLSE, seqlen, m_block, head_idx, batch_idx)
        thread = cute.arch.thread_idx()[0] % self.num_mma_threads
        lines_per_row = cute.ceil_div(self.tile_hdimv, FP32_PER_LINE)
        lines = self.tile_m * lines_per_row
        for i in cutlass.range_constexpr(cute.ceil_div(lines, self.num_mma_threads)):
            line = thread + i * self.num_mma_threads
            row = line // lines_per_row
            if line < lines:
                if row < rows_in_tile:
                    prefetch_l2(elem_pointer(gO, (row, (line % lines_per_row) * FP32_PER_LINE)))
        for i in cutlass.range_constexpr(cute.ceil_div(self.tile_m, self.num_mma_threads)):
            row = thread + i * self.num_mma_threads
            if row < self.tile_m:
                if row < rows_in_tile:
                    prefetch_l2(elem_pointer(gLSE, (row,)))

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
        gO, gLSE, rows_in_tile = self._accumulator_tiles(mO, mLSE, seqlen, m_block, head_idx, batch_idx)
        tOgO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(gO))
        tOrO = layout_utils.reshape_acc_to_mn(acc_O)
        tOcO = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_hdimv))))
        num_rows = cute.size(tOrO, mode=[0])
        num_cols = cute.size(tOrO, mode=[1])
        # A row's out moves between registers and memory in vectors (autovec_copy: the MMA
        # layout's column pairs, 8 bytes a thread), not one fp32 at a time. Each row's registers
        # hold its prior out, then its merged out.
        rows_out = [cute.make_rmem_tensor_like(tOrO[0, None], Float32) for _ in range(num_rows)]
        rows_read_with_lse = min(num_rows, max(1, PRIOR_VALUES_READ_AT_ONCE // num_cols))

        # One wait on memory for the prior lse and out: both are read before the barrier, the
        # out whether or not the row saw a key (unset memory then, never used).
        lse_prior = cute.make_rmem_tensor_like(lse, Float64)
        for m in cutlass.range_constexpr(num_rows):
            lse_prior[m] = -Float64.inf
            if const_expr(self.accumulate):
                if tOcO[m, 0][0] < rows_in_tile:
                    lse_prior[m] = gLSE[tOcO[m, 0][0]]
                    if const_expr(m < rows_read_with_lse):
                        cute.autovec_copy(tOgO[m, None], rows_out[m])
        # The four threads of a row all read its prior lse before one of them overwrites it.
        cute.arch.barrier(barrier_id=int(NamedBarrierFwd.Epilogue), number_of_threads=self.num_epilogue_threads)

        for m in cutlass.range_constexpr(num_rows):
            row = tOcO[m, 0][0]
            if row < rows_in_tile:
                lse_new, weight_prior, weight_tile = merged_lse_and_weights(lse_prior[m], Float64(lse[m]))
                # No key merged into this row yet: its prior out is unset and not used.
                if lse_prior[m] != -Float64.inf:
                    if const_expr(m >= rows_read_with_lse):
                        cute.autovec_copy(tOgO[m, None], rows_out[m])
                    for n in cutlass.range(num_cols, unroll_full=True):
                        rows_out[m][n] = rows_out[m][n] * weight_prior + tOrO[m, n] * weight_tile
                else:
                    for n in cutlass.range(num_cols, unroll_full=True):
                        rows_out[m][n] = tOrO[m, n] * weight_tile
                cute.autovec_copy(rows_out[m], tOgO[m, None])
                if tOcO[m, 0][1] == 0:
                    gLSE[row] = lse_new

    @cute.jit
    def _accumulator_tiles(self, mO: cute.Tensor, mLSE: cute.Tensor, seqlen, m_block: cutlass.Int32, head_idx: cutlass.Int32, batch_idx):
        """Tile m_block's out (tile_m, head_dim_v) and lse (tile_m,) of the accumulators, and how
        many of its rows the block has."""
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
        return gO, gLSE, rows_in_tile

    @cute.jit
    def _packed_tile(self, packed: cute.Tensor, m_block: cutlass.Int32, rest_origin: tuple, rest_shape: tuple) -> cute.Tensor:
        """Tile m_block of a tensor whose first mode is upstream's fold (q heads, tokens): the
        tile_m rows as (q heads, tile_m / q heads tokens), the other modes of `rest_shape`."""
        tokens = self.tile_m // self.qhead_per_kvhead
        origin = cute.domain_offset(((0, m_block * tokens), *rest_origin), packed)
        layout = cute.make_layout(((self.qhead_per_kvhead, tokens), *rest_shape), stride=origin.stride)
        return cute.make_tensor(origin.iterator, layout)
