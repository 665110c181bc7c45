"""FA4's Blackwell backward for one block, with dK/dV accumulated by the kernel itself.

UNTESTED on a GPU: this project's machines are Hoppers. It compiles for sm_100a in CI
(tests/test_kernel_compile.py), and the GPU tests that select the FA4 backend on any sm90/sm100
device run it wherever a B200 or GB200 is.

`AccumulatingBackwardSm100` is upstream's FlashAttentionBackwardSm100 with one part replaced: the
dK/dV epilogue. Upstream writes dK/dV as 16-bit tensors (one q head per kv head) or, for GQA,
reduces each tile into fp32 accumulators of its own tiled layout by TMA, to be post-processed. Here
every tile takes the second route (`OneHeadAsGroup`), and the epilogue reads the tile from tensor
memory and adds it straight into the caller's fp32 buffers, shaped like K and V, at the rows the
block addresses, as the Hopper kernel does (backward_sm90.py): the q heads of a kv head meet there
through atomic adds, so GQA is reduced inside the kernel, and the ring's travelling dK/dV and the
home sums take every step's tiles with no partial, fill or add kernel. dK is left unscaled (the
caller scales the sum once). With `deterministic`, upstream's semaphores order dq's accumulation,
and the q heads of a kv head take turns on a tile's dK/dV in head order (each warpgroup on its
half of the columns, as upstream's own epilogue takes its turns), so every sum is added in a
fixed order.

What it takes: upstream's tiles and CTA pairing for the head dims (`two_ctas`: one CTA per tile
below 128, two from 128, as upstream's interface chooses), head dims 64, 96, 128 and MLA's
192 / 128; not 256 (upstream's 64-row KV tiles there split each row across two tensor-memory
lanes: the ring's Blackwell pass runs upstream's backward for it, passes_sm100.py). Everything
else, main loop, dq accumulation and schedulers, is upstream's.
"""

from __future__ import annotations

import math
from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import tcgen05
from flash_attn.cute import barrier
from flash_attn.cute.block_sparsity import BlockSparseTensors
from flash_attn.cute.flash_bwd_sm100 import FlashAttentionBackwardSm100
from flash_attn.cute.interface import torch2cute_dtype_map
from flash_attn.cute.utils import AuxData, create_softcap_scoremod, create_softcap_scoremod_bwd, elem_pointer

from .accumulator_rows import OneHeadAsGroup, block_rows, rows_carrier
from .arguments import NO_AUX
from .compile_cache import kernel_cache
from .fake_tensors import FakeBackwardArguments
from .masks import Fa4Window
from .vector_memory import add_pair

_compiled = kernel_cache("backward_sm100")

TILE_M = TILE_N = 128
"""Upstream's Blackwell backward tiles (flash_attn.cute.interface) at the head dims below."""
HEAD_DIMS = ((64, 64), (96, 96), (128, 128), (192, 128))
"""(k's head_dim, v's) that the kernel takes."""


def two_ctas(head_dim: int) -> bool:
    """Whether a tile's MMAs span a pair of CTAs, as upstream's interface decides it."""
    return head_dim >= 128


class AccumulatingBackwardSm100(FlashAttentionBackwardSm100):
    """Upstream's Blackwell backward whose epilogue accumulates dK/dV into fp32 row buffers (see
    the module's docstring). dK and dV are (b, s, h_kv, d) or varlen (total, h_kv, d) fp32 tensors
    with unit stride along d."""

    def __init__(self, head_dim: int, head_dim_v: int, *, qhead_per_kvhead: int, **kwargs):
        if (head_dim, head_dim_v) not in HEAD_DIMS:
            raise ValueError(f"the accumulating Blackwell backward takes (head_dim, v's head_dim) in {HEAD_DIMS}, got {(head_dim, head_dim_v)}")
        ratio = OneHeadAsGroup(1) if qhead_per_kvhead == 1 else qhead_per_kvhead
        super().__init__(head_dim, head_dim_v, qhead_per_kvhead=ratio, **kwargs)
        if self.acc_m64:
            raise ValueError("the accumulating Blackwell backward: 128-row KV tiles only")

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
        stream: cuda.CUstream = None,
    ):
        # Upstream's set-up permutes fp32 accumulators as (b, h_kv, rows) or (h_kv, rows); the
        # rows mode carries (s, d) whole to the epilogue.
        super().__call__(
            mQ, mK, mV, mdO, mLSE, mdPsum, mdQaccum, rows_carrier(mdK), rows_carrier(mdV), softmax_scale,
            mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, window_size_left, window_size_right,
            mdQ_semaphore, mdK_semaphore, mdV_semaphore, aux_data, blocksparse_tensors, mCuTotalMBlocks, stream,
        )

    @cute.jit
    def epilogue_dK_or_dV_tma(
        self,
        tidx: Int32,
        batch_idx: Int32,
        head_idx: Int32,
        n_block: Int32,
        seqlen,
        thr_mma: cute.ThrMma,
        tdKVtdKV: cute.Tensor,
        mdKV: cute.Tensor,
        sdKV: cute.Tensor,
        tma_atom_dKV: cute.CopyAtom,
        thr_copy_r2s_dKV: cute.TiledCopy,
        pipeline_dKV: cutlass.pipeline.PipelineAsync,
        consumer_state_dKV: cutlass.pipeline.PipelineState,
        scale: Optional[Float32],
        barrier_id: Int32,
        mdKV_semaphore: Optional[cute.Tensor],
        K_or_V: cutlass.Constexpr[str],
    ) -> cutlass.pipeline.PipelineState:
        """One of dK or dV of the tile, from tensor memory into the caller's rows by atomic adds
        (no shared memory or TMA: upstream's arguments for those go unused). With a CTA pair,
        `n_block` is this CTA's tile and the coordinates are the pair's: its MMA slice holds this
        CTA's rows of the pair's tile. `tidx` is the thread's index in its warpgroup."""
        width = self.tile_hdim if const_expr(K_or_V == "K") else self.tile_hdimv
        num_compute_threads = cute.arch.WARP_SIZE * len(self.compute_warp_ids)
        wg_idx = (cute.arch.thread_idx()[0] % num_compute_threads) // 128
        num_wg = num_compute_threads // 128
        rows = block_rows(mdKV, seqlen, head_idx // self.qhead_per_kvhead, batch_idx)
        pair_rows = self.cta_group_size * self.tile_n
        pair_block = n_block // self.cta_group_size
        gX = cute.local_tile(rows, (pair_rows, width), (pair_block, 0))
        rows_in_tile = seqlen.seqlen_k - pair_block * pair_rows
        # Each thread loads one row of the tile (a tensor-memory lane), `repetition` adjacent
        # columns per load: each warpgroup a whole number of loads of its half of the columns.
        repetition = math.gcd(16, width // num_wg)
        load_atom = cute.make_copy_atom(tcgen05.copy.Ld32x32bOp(tcgen05.copy.Repetition(repetition)), Float32)
        pipeline_dKV.consumer_wait(consumer_state_dKV)
        if const_expr(self.deterministic):  # this q head's turn on the tile, for this warpgroup's columns
            lock = mdKV_semaphore[n_block, None, head_idx // self.qhead_per_kvhead, batch_idx].iterator
            barrier.wait_eq(lock, tidx, wg_idx, head_idx % self.qhead_per_kvhead)
            cute.arch.barrier(barrier_id=barrier_id + wg_idx, number_of_threads=128)
        thr_load = tcgen05.make_tmem_copy(load_atom, tdKVtdKV).get_slice(tidx)
        tXtX = self.split_wg(thr_load.partition_S(tdKVtdKV), wg_idx, num_wg)
        tXcX = self.split_wg(thr_load.partition_D(thr_mma.partition_C(cute.make_identity_tensor((pair_rows, width)))), wg_idx, num_wg)
        tXrX = cute.make_rmem_tensor(tXcX.shape, Float32)
        cute.copy(thr_load, tXtX, tXrX)
        cute.arch.fence_view_async_tmem_load()
        # ((repetition, 1), loads, 1, 1): a load's values are adjacent columns of the thread's row
        for load in cutlass.range_constexpr(cute.size(tXrX, mode=[1])):
            if tXcX[(0, 0), load, 0, 0][0] < rows_in_tile:
                for pair in cutlass.range_constexpr(repetition // 2):
                    column = 2 * pair
                    pointer = elem_pointer(gX, tXcX[(column, 0), load, 0, 0])
                    add_pair(tXrX[(column, 0), load, 0, 0], tXrX[(column + 1, 0), load, 0, 0], pointer)
        if const_expr(self.deterministic):  # every thread's adds land before the next head's turn starts
            cute.arch.fence_acq_rel_gpu()
            cute.arch.barrier(barrier_id=barrier_id + wg_idx, number_of_threads=128)
            barrier.arrive_inc(lock, tidx, wg_idx, 1)
        cute.arch.sync_warp()
        with cute.arch.elect_one():
            pipeline_dKV.consumer_release(consumer_state_dKV)
        consumer_state_dKV.advance()
        return consumer_state_dKV


def backward_kernel_sm100(
    dtype: torch.dtype, head_dim: int, head_dim_v: int, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, softcap: float | None = None,
    deterministic: bool = False,
):
    """The compiled accumulating Blackwell backward of one configuration (compiled at first use,
    then from the cache). A softcap is a constant of the kernel: upstream's score mod and its
    derivative. A deterministic kernel takes upstream's three semaphore tensors
    (`arguments.turn_counters`), zeroed, after the window."""
    key = (str(dtype), head_dim, head_dim_v, qhead_per_kvhead, *window.kind, varlen, softcap, deterministic)
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[dtype], head_dim, head_dim_v, qhead_per_kvhead, window, varlen, softcap, deterministic)
    return _compiled[key]


def _compile(
    dtype, head_dim: int, head_dim_v: int, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, softcap: float | None,
    deterministic: bool = False,
):
    score_mods = {} if softcap is None else dict(
        score_mod=create_softcap_scoremod(softcap), score_mod_bwd=create_softcap_scoremod_bwd(softcap),
    )
    pair = two_ctas(head_dim)
    kernel = AccumulatingBackwardSm100(
        head_dim, head_dim_v, is_causal=window.causal, is_local=window.local, qhead_per_kvhead=qhead_per_kvhead,
        tile_m=TILE_M, tile_n=TILE_N, cluster_size=2 if pair else 1, use_2cta_instrs=pair, deterministic=deterministic, **score_mods,
    )
    arguments = FakeBackwardArguments.make(dtype, head_dim, head_dim_v, varlen)
    semaphores = arguments.semaphores(2 if pair else 1) if deterministic else (None, None, None)
    window_left = Int32(0) if window.left is not None else None
    window_right = Int32(0) if window.right is not None else None
    return cute.compile(
        kernel, *arguments.tensors, Float32(1.0), *arguments.block.varlen_tensors,
        window_left, window_right, *semaphores, NO_AUX, None, None,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
