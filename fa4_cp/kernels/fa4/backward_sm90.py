"""FA4's Hopper backward for one block: the tile configuration, and the kernel compiled once per
configuration (cached in memory and on disk).

The kernel is upstream's FlashAttentionBackwardSm90, unchanged. It reads FA4's padded row
statistics (lse * log2(e), and delta as dpsum) and adds the block's dq into an fp32 dq
accumulator in FA4's tiled layout, so dq accumulates across ring steps with no pass of its own.
dK/dV of a kv block come out per call: 16-bit and scaled when each kv head serves one q head,
fp32 unscaled in FA4's tiled accumulator layout for GQA.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
from flash_attn.cute.interface import BwdConfig, _tile_size_bwd_sm90, torch2cute_dtype_map
from flash_attn.cute.utils import create_softcap_scoremod, create_softcap_scoremod_bwd
from quack.compile_utils import make_fake_tensor

from .arguments import NO_AUX
from .compile_cache import kernel_cache
from .fake_tensors import FakeBlockRows
from .masks import Fa4Window

_compiled = kernel_cache("backward_sm90")


@dataclass(frozen=True)
class BackwardTiles:
    """One backward configuration for every call of a pass, so that all of them accumulate dq
    in one tiled layout. Upstream's causal tiles serve every mask: for head_dim 128 its
    non-causal choice (80-row tiles) would give full-mask and causal blocks different dq layouts."""

    config: BwdConfig
    head_dim: int

    @staticmethod
    @functools.cache
    def for_head_dim(head_dim: int) -> BackwardTiles:
        return BackwardTiles(_tile_size_bwd_sm90(head_dim, head_dim, True, False), head_dim)

    @functools.cached_property
    def compile_key(self) -> tuple:
        return (self.head_dim, *astuple(self.config))

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


def backward_kernel(
    tiles: BackwardTiles, dtype: torch.dtype, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, softcap: float | None = None,
):
    """The compiled backward of one configuration (compiled at first use, then from the cache).
    A softcap is a constant of the kernel: upstream's score mod and its derivative."""
    key = (str(dtype), *tiles.compile_key, qhead_per_kvhead, *window.kind, varlen, softcap)
    if key not in _compiled:
        _compiled[key] = _compile(tiles, torch2cute_dtype_map[dtype], qhead_per_kvhead, window, varlen, softcap)
    return _compiled[key]


def _compile(tiles: BackwardTiles, dtype, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, softcap: float | None):
    config = tiles.config
    score_mods = {} if softcap is None else dict(
        score_mod=create_softcap_scoremod(softcap), score_mod_bwd=create_softcap_scoremod_bwd(softcap),
    )
    kernel = FlashAttentionBackwardSm90(
        dtype,
        tiles.head_dim,
        tiles.head_dim,
        qhead_per_kvhead,
        window.causal,
        is_local=window.local,
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
        **score_mods,
    )
    sym = cute.sym_int
    heads, kv_heads, head_dim = sym(), sym(), tiles.head_dim
    block = FakeBlockRows.make(varlen)
    rows_q, rows_k, lead = block.rows_q, block.rows_k, block.lead
    vector = 128 // dtype.width
    q = make_fake_tensor(dtype, (*rows_q, heads, head_dim), divisibility=vector)
    dout = make_fake_tensor(dtype, (*rows_q, heads, head_dim), divisibility=vector)
    k, v = (make_fake_tensor(dtype, (*rows_k, kv_heads, head_dim), divisibility=vector) for _ in range(2))
    rows_padded = sym()
    lse_log2, dpsum = (make_fake_tensor(Float32, (*lead, heads, rows_padded), divisibility=4) for _ in range(2))
    dq_accum = make_fake_tensor(Float32, (*lead, heads, sym()), divisibility=4)
    if qhead_per_kvhead == 1:
        dk, dv = (make_fake_tensor(dtype, (*rows_k, kv_heads, head_dim), divisibility=vector) for _ in range(2))
    else:
        dk, dv = (make_fake_tensor(Float32, (*lead, kv_heads, sym()), divisibility=4) for _ in range(2))
    window_left = Int32(0) if window.left is not None else None
    window_right = Int32(0) if window.right is not None else None
    return cute.compile(
        kernel, q, k, v, dout, lse_log2, dpsum, dq_accum, dk, dv, Float32(1.0), *block.varlen_tensors,
        window_left, window_right, None, None, None, NO_AUX, None, None,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
