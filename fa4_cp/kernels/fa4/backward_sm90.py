"""FA4's Hopper backward for one block, with dK/dV accumulated by the kernel itself.

`AccumulatingBackwardSm90` is upstream's FlashAttentionBackwardSm90 with one part replaced: the
dK/dV epilogue. Upstream writes dK/dV as 16-bit tensors (one q head per kv head) or reduces them
into fp32 accumulators in its own tiled layout (GQA), to be post-processed. Here the epilogue adds
each tile's dK and dV straight into the caller's fp32 buffers, shaped like K and V (any row and
head strides), at the rows the block addresses: the q heads of a kv head meet there through
atomic adds, so GQA is reduced inside the kernel, and varlen entries whose KV ranges overlap sum.
Upstream's varlen grid covers K's rows once; for entries whose KV rows add up to more, the launch
takes their total (`kv_rows_launched`) and presents K and V with that many rows, so that every
entry's tiles get blocks. Those rows are read only up to one tile past the last entry's end,
which the caller keeps finite (VarlenRows.shared_kv_rows).
dK is left unscaled (the caller scales the sum once). In `write_first` mode the tile overwrites
its rows instead (one q head per kv head, or deterministic GQA, where the first head writes).
With `deterministic`, upstream's semaphores order dq's accumulation, and the q heads of a kv head
take turns on dK/dV in head order, so every sum is added in a fixed order.

Everything else, main loop, dq accumulation and schedulers, is upstream's, compiled once per
configuration (cached in memory and on disk). dq accumulates across ring steps in FA4's fp32
tiled layout, read back once per call.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass
from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32, const_expr
from flash_attn.cute import barrier
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
from flash_attn.cute.interface import BwdConfig, _tile_size_bwd_sm90, torch2cute_dtype_map
from flash_attn.cute.block_sparsity import BlockSparseTensors
from flash_attn.cute.named_barrier import NamedBarrierBwd
from flash_attn.cute.utils import AuxData, create_softcap_scoremod, create_softcap_scoremod_bwd, elem_pointer
from quack import layout_utils

from .accumulator_rows import OneHeadAsGroup, block_rows, rows_carrier
from .arguments import NO_AUX
from .compile_cache import kernel_cache
from .fake_tensors import FakeBackwardArguments
from .masks import Fa4Window
from .vector_memory import add_one, add_pair, store_one, store_pair

_compiled = kernel_cache("backward_sm90")


@dataclass(frozen=True)
class BackwardTiles:
    """One backward configuration for every call of a pass, so that all of them accumulate dq
    in one tiled layout. Upstream's causal tiles serve every mask: for head_dim 128 its
    non-causal choice (80-row tiles) would give full-mask and causal blocks different dq layouts."""

    config: BwdConfig
    head_dim: int
    head_dim_v: int
    """v's (and dout's); narrower than q's and k's in MLA (192 / 128)."""

    @staticmethod
    @functools.cache
    def for_head_dim(head_dim: int, head_dim_v: int | None = None) -> BackwardTiles:
        """Upstream's causal tiles. At head_dim 192 and 256 these swap the dK/dV MMAs' operands
        (96- and 48-row KV tiles), which the epilogue takes one float at a time: 1.02-1.09x
        upstream's backward on an H200, where 64-row unswapped tiles ran 0.79-0.87x
        (bench/results/nvidia_h200_2026-12-06/kernels_new_dims_8k.json)."""
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        return BackwardTiles(_tile_size_bwd_sm90(head_dim, head_dim_v, True, False), head_dim, head_dim_v)

    @functools.cached_property
    def compile_key(self) -> tuple:
        return (self.head_dim, self.head_dim_v, *astuple(self.config))

    @property
    def tile_m(self) -> int:
        return self.config.m_block_size

    @property
    def tile_n(self) -> int:
        return self.config.n_block_size

    @property
    def hdim_multiple_of(self) -> int:
        return 64 if self.config.dKV_swapAB else 32

    @property
    def head_dim_rounded(self) -> int:
        step = self.hdim_multiple_of
        return -(-self.head_dim // step) * step

    @property
    def num_threads(self) -> int:
        return (self.config.num_wg + 1) * 128


class AccumulatingBackwardSm90(FlashAttentionBackwardSm90):
    """Upstream's Hopper backward whose epilogue accumulates dK/dV into fp32 row buffers (see the
    module's docstring). dK and dV are (b, s, h_kv, d) or varlen (total, h_kv, d) fp32 tensors with
    unit stride along d."""

    def __init__(self, *args, qhead_per_kvhead: int, write_first: bool, **kwargs):
        # Upstream's set-up asserts equal K and V head dims for GQA because its own dK/dV epilogue
        # needs them; this class replaces that epilogue, so the ratio is set after the set-up.
        super().__init__(*args, qhead_per_kvhead=1, **kwargs)
        self.qhead_per_kvhead = OneHeadAsGroup(1) if qhead_per_kvhead == 1 else qhead_per_kvhead
        if write_first and qhead_per_kvhead > 1 and not self.deterministic:
            raise ValueError("write_first with GQA needs deterministic: the q heads of a kv head race otherwise")
        self.write_first = write_first

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mdO: cute.Tensor,
        mLSE: cute.Tensor,
        mdPsum: cute.Tensor,
        mdQaccum: cute.Tensor,
        mdK: cute.Tensor,
        mdV: cute.Tensor,
        softmax_scale: Float32,
        mCuSeqlensQ: Optional[cute.Tensor] = None,
        mCuSeqlensK: Optional[cute.Tensor] = None,
        mSeqUsedQ: Optional[cute.Tensor] = None,
        mSeqUsedK: Optional[cute.Tensor] = None,
        window_size_left: Int32 | int | None = None,
        window_size_right: Int32 | int | None = None,
        mdQ_semaphore: Optional[cute.Tensor] = None,
        mdK_semaphore: Optional[cute.Tensor] = None,
        mdV_semaphore: Optional[cute.Tensor] = None,
        aux_data: AuxData = AuxData(),
        blocksparse_tensors: Optional[BlockSparseTensors] = None,
        mCuTotalMBlocks: Optional[cute.Tensor] = None,
        kv_rows_launched: Int32 | int | None = None,
        stream: cuda.CUstream = None,
    ):
        if const_expr(kv_rows_launched is not None):  # upstream sizes its varlen grid by K's rows
            mK, mV = (_with_rows(t, kv_rows_launched) for t in (mK, mV))
        # Upstream's set-up permutes fp32 accumulators as (b, h_kv, rows) or (h_kv, rows); the
        # rows mode carries (s, d) whole to the epilogue.
        super().__call__(
            mQ, mK, mV, mdO, mLSE, mdPsum, mdQaccum, rows_carrier(mdK), rows_carrier(mdV), softmax_scale,
            mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, window_size_left, window_size_right,
            mdQ_semaphore, mdK_semaphore, mdV_semaphore, aux_data, blocksparse_tensors, mCuTotalMBlocks, stream,
        )

    @cute.jit
    def epilogue_dKV(
        self,
        acc_dV: cute.Tensor,
        mdV: cute.Tensor,
        sV: cute.Tensor,
        acc_dK: cute.Tensor,
        mdK: cute.Tensor,
        sK: cute.Tensor,
        seqlen,
        tma_atom_dK,
        tma_atom_dV,
        tiled_mma_dK: cute.TiledMma,
        tiled_mma_dV: cute.TiledMma,
        tidx: Int32,
        n_block: Int32,
        head_idx: Int32,
        batch_idx: Int32,
        qhead_per_kvhead_divmod=None,
        mdK_semaphore=None,
        mdV_semaphore=None,
    ):
        head_kv = head_idx // qhead_per_kvhead_divmod
        rows_in_tile = seqlen.seqlen_k - n_block * self.tile_n
        epilogue_threads = cutlass.pipeline.NamedBarrier(barrier_id=int(NamedBarrierBwd.Epilogue), num_threads=self.num_mma_threads)
        writes = const_expr(self.write_first)
        if const_expr(self.deterministic):
            turn = head_idx % self.qhead_per_kvhead
            writes = turn == 0 if const_expr(self.write_first) else False
            lock = mdK_semaphore[n_block, None, head_kv, batch_idx].iterator
            barrier.wait_eq(lock, tidx, 0, turn)
            epilogue_threads.arrive_and_wait()
        for acc, mX, tiled_mma, width in ((acc_dK, mdK, tiled_mma_dK, self.tile_hdim), (acc_dV, mdV, tiled_mma_dV, self.tile_hdimv)):
            rows = block_rows(mX, seqlen, head_kv, batch_idx)
            gX = cute.local_tile(rows, (self.tile_n, width), (n_block, 0))
            thr_mma = tiled_mma.get_slice(tidx)
            tXrX = layout_utils.reshape_acc_to_mn(acc)
            if const_expr(not self.dKV_swapAB):
                # (kv row, column) accumulators: each thread's pairs are adjacent columns of a row
                tXcX = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cute.make_identity_tensor((self.tile_n, width))))
                for m in cutlass.range(cute.size(tXrX, mode=[0]), unroll_full=True):
                    if tXcX[m, 0][0] < rows_in_tile:
                        for pair in cutlass.range(cute.size(tXrX, mode=[1]) // 2, unroll_full=True):
                            n = 2 * pair
                            pointer = elem_pointer(gX, tXcX[m, n])
                            if writes:
                                store_pair(tXrX[m, n], tXrX[m, n + 1], pointer)
                            else:
                                add_pair(tXrX[m, n], tXrX[m, n + 1], pointer)
            else:
                # swapped operands: (column, kv row) accumulators, pairs in adjacent rows; once
                # per tile, so one float at a time costs little next to the main loop
                tXcX = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cute.make_identity_tensor((width, self.tile_n))))
                for m in cutlass.range(cute.size(tXrX, mode=[0]), unroll_full=True):
                    for n in cutlass.range(cute.size(tXrX, mode=[1]), unroll_full=True):
                        column_and_row = tXcX[m, n]
                        if column_and_row[1] < rows_in_tile:
                            pointer = elem_pointer(gX, (column_and_row[1], column_and_row[0]))
                            if writes:
                                store_one(tXrX[m, n], pointer)
                            else:
                                add_one(tXrX[m, n], pointer)
        if const_expr(self.deterministic):
            # Every thread's adds land before the next head's turn starts.
            cute.arch.fence_acq_rel_gpu()
            epilogue_threads.arrive_and_wait()
            barrier.arrive_inc(lock, tidx, 0, 1)


@cute.jit
def _with_rows(rows: cute.Tensor, count: Int32) -> cute.Tensor:
    """A varlen (total, h, d) tensor presented with `count` rows, its strides unchanged."""
    return cute.make_tensor(rows.iterator, cute.make_layout((count, rows.shape[1], rows.shape[2]), stride=rows.stride))


def backward_kernel(
    tiles: BackwardTiles, dtype: torch.dtype, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, softcap: float | None = None,
    *, write_first: bool = False, deterministic: bool = False, write_rounded: bool = False, shared_kv: bool = False,
):
    """The compiled backward of one configuration (compiled at first use, then from the cache).
    A softcap is a constant of the kernel: upstream's score mod and its derivative. With
    `write_rounded` (one q head per kv head), upstream's own kernel, whose epilogue writes dK
    (scaled) and dV in the inputs' dtype: for a block that is its rows' only contributor. The
    accumulating kernel's last launch argument is the kv rows its grid covers: None (K's), or
    with `shared_kv` (varlen entries whose KV rows overlap) their total."""
    key = (
        str(dtype), *tiles.compile_key, qhead_per_kvhead, *window.kind, varlen, softcap, write_first, deterministic, write_rounded,
        shared_kv,
    )
    if key not in _compiled:
        _compiled[key] = _compile(
            tiles, torch2cute_dtype_map[dtype], qhead_per_kvhead, window, varlen, softcap, write_first, deterministic, write_rounded,
            shared_kv,
        )
    return _compiled[key]


def _compile(
    tiles: BackwardTiles, dtype, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, softcap: float | None,
    write_first: bool = False, deterministic: bool = False, write_rounded: bool = False, shared_kv: bool = False,
):
    config = tiles.config
    score_mods = {} if softcap is None else dict(
        score_mod=create_softcap_scoremod(softcap), score_mod_bwd=create_softcap_scoremod_bwd(softcap),
    )
    if write_rounded and (qhead_per_kvhead != 1 or write_first or shared_kv):
        raise ValueError("write_rounded: one q head per kv head, and not with write_first or shared KV rows")
    if shared_kv and (not varlen or deterministic):
        raise ValueError("shared KV rows: varlen entries, not deterministic")
    kernel_class, own = (FlashAttentionBackwardSm90, {}) if write_rounded else (AccumulatingBackwardSm90, dict(write_first=write_first))
    kernel = kernel_class(
        dtype,
        tiles.head_dim,
        tiles.head_dim_v,
        is_causal=window.causal,
        is_local=window.local,
        deterministic=deterministic,
        tile_m=config.m_block_size,
        tile_n=config.n_block_size,
        Q_stage=config.num_stages_Q,
        dO_stage=config.num_stages_dO,
        PdS_stage=config.num_stages_PdS,
        SdP_swapAB=config.SdP_swapAB,
        dKV_swapAB=config.dKV_swapAB,
        dQ_swapAB=config.dQ_swapAB,
        AtomLayoutMSdP=config.AtomLayoutMSdP,
        AtomLayoutNdKV=config.AtomLayoutNdKV,
        AtomLayoutMdQ=config.AtomLayoutMdQ,
        num_threads=tiles.num_threads,
        dQ_single_wg=config.dQ_single_wg,
        qhead_per_kvhead=qhead_per_kvhead,
        **own,
        **score_mods,
    )
    arguments = FakeBackwardArguments.make(dtype, tiles.head_dim, tiles.head_dim_v, varlen, dtype if write_rounded else Float32)
    semaphores = arguments.semaphores() if deterministic else (None, None, None)
    window_left = Int32(0) if window.left is not None else None
    window_right = Int32(0) if window.right is not None else None
    grid_rows = () if write_rounded else (Int32(0) if shared_kv else None,)
    return cute.compile(
        kernel, *arguments.tensors, Float32(1.0), *arguments.block.varlen_tensors,
        window_left, window_right, *semaphores, NO_AUX, None, None, *grid_rows,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
