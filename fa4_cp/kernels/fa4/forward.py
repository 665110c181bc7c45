"""Forward with LSE partials on Hopper: compile (once per configuration, cached) and launch."""

from __future__ import annotations

import cutlass.cute as cute
import torch
from cutlass import Float32, Float64, Int32
from flash_attn.cute.interface import _tile_size_fwd_sm90, torch2cute_dtype_map
from flash_attn.cute.utils import AuxData
from quack.compile_utils import make_fake_tensor

from ..interface import BandMask, VarlenRows
from .compile_cache import kernel_cache
from .fake_tensors import FakeBlockRows
from .forward_sm90 import PartialsForwardSm90
from .masks import Fa4Window, block_window

_compiled = kernel_cache("forward_sm90")


def forward_partials_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    *,
    mask: BandMask,
    softmax_scale: float,
    accumulate: bool,
    varlen: VarlenRows | None,
) -> None:
    window = block_window(mask, q, k, varlen)
    head_dim, qhead_per_kvhead = q.shape[-1], q.shape[-2] // k.shape[-2]
    config = _tile_size_fwd_sm90(head_dim, head_dim, window.causal, window.local)
    key = (
        str(q.dtype), head_dim, qhead_per_kvhead, window.causal, window.local,
        window.left is not None, window.right is not None, varlen is not None,
        config.m_block_size, config.n_block_size, config.mma_pv_is_rs, config.intra_wg_overlap, accumulate,
    )
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[q.dtype], head_dim, qhead_per_kvhead, window, varlen is not None, config, accumulate)
    cu_q, cu_k, used_q, used_k = (None,) * 4 if varlen is None else (
        varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.seqused_q, varlen.seqused_k
    )
    _compiled[key](
        q, k, v, out_acc, lse_acc, softmax_scale, cu_q, cu_k, used_q, used_k, None,
        window.left, window.right, None, None, AuxData(None, None), None, None,
    )


def _compile(dtype, head_dim: int, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, config, accumulate: bool):
    kernel = PartialsForwardSm90(
        dtype,
        head_dim,
        head_dim,
        qhead_per_kvhead,
        is_causal=window.causal,
        is_local=window.local,
        pack_gqa=False,
        tile_m=config.m_block_size,
        tile_n=config.n_block_size,
        num_stages=2,
        Q_in_regs=False,
        intra_wg_overlap=config.intra_wg_overlap,
        mma_pv_is_rs=config.mma_pv_is_rs,
        accumulate=accumulate,
    )
    heads, kv_heads = cute.sym_int(), cute.sym_int()
    block = FakeBlockRows.make(varlen)
    rows_q, rows_k = block.rows_q, block.rows_k
    vector = 128 // dtype.width
    q = make_fake_tensor(dtype, (*rows_q, heads, head_dim), divisibility=vector)
    k, v = (make_fake_tensor(dtype, (*rows_k, kv_heads, head_dim), divisibility=vector) for _ in range(2))
    out = make_fake_tensor(Float32, (*rows_q, heads, head_dim), divisibility=4)
    lse = make_fake_tensor(Float64, (*block.lead, heads, rows_q[-1]))
    window_left = Int32(0) if window.left is not None else None
    window_right = Int32(0) if window.right is not None else None
    return cute.compile(
        kernel, q, k, v, out, lse, Float32(1.0), *block.varlen_tensors, None,
        window_left, window_right, None, None, AuxData(None, None), None, None,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )

