"""FA4's Hopper backward for one block: compile (once per configuration, cached) and launch.

The kernel is upstream's FlashAttentionBackwardSm90, unchanged. It reads FA4's padded row
statistics (lse * log2(e), and delta as dpsum) and adds the block's dq into an fp32 dq
accumulator in FA4's tiled layout, so dq accumulates across ring steps with no pass of its own.
dK/dV of a kv block come out per call: 16-bit and scaled when each kv head serves one q head,
fp32 unscaled in FA4's tiled accumulator layout for GQA.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
from flash_attn.cute.interface import BwdConfig, _tile_size_bwd_sm90, torch2cute_dtype_map
from flash_attn.cute.utils import AuxData
from quack.compile_utils import make_fake_tensor

from ..interface import VarlenRows
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
    def for_head_dim(head_dim: int) -> BackwardTiles:
        return BackwardTiles(_tile_size_bwd_sm90(head_dim, head_dim, True, False), head_dim)

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


def backward_block_sm90(
    tiles: BackwardTiles,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse_log2: torch.Tensor,
    dpsum: torch.Tensor,
    dq_accum: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    window: Fa4Window,
    softmax_scale: float,
    varlen: VarlenRows | None,
) -> None:
    qhead_per_kvhead = q.shape[-2] // k.shape[-2]
    key = (
        str(q.dtype), tiles.head_dim, *astuple(tiles.config), qhead_per_kvhead, window.causal, window.local,
        window.left is not None, window.right is not None, varlen is not None,
    )
    if key not in _compiled:
        _compiled[key] = _compile(tiles, torch2cute_dtype_map[q.dtype], qhead_per_kvhead, window, varlen is not None)
    cu_q, cu_k, used_q, used_k = (None,) * 4 if varlen is None else (
        varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.seqused_q, varlen.seqused_k
    )
    _compiled[key](
        q, k, v, dout, lse_log2, dpsum, dq_accum, dk, dv, softmax_scale, cu_q, cu_k, used_q, used_k,
        window.left, window.right, None, None, None, AuxData(None, None), None, None,
    )


def _compile(tiles: BackwardTiles, dtype, qhead_per_kvhead: int, window: Fa4Window, varlen: bool):
    config = tiles.config
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
        window_left, window_right, None, None, None, AuxData(None, None), None, None,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
