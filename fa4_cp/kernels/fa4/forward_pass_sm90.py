"""Forward with LSE partials on Hopper: one pass per ring call, kernels compiled once per
configuration (cached in memory and on disk) and bound to the pass."""

from __future__ import annotations

import cutlass.cute as cute
import torch
from cutlass import Float32, Float64, Int32
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.interface import _tile_size_fwd_sm90, torch2cute_dtype_map
from flash_attn.cute.utils import create_softcap_scoremod
from quack.compile_utils import make_fake_tensor

from ..interface import BandMask, VarlenRows
from .arguments import NO_AUX, varlen_arguments
from .compile_cache import kernel_cache
from .fake_tensors import FakeBlockRows
from .forward_sm90 import PartialsForwardSm90
from .masks import Fa4Window, block_window

_compiled = kernel_cache("forward_sm90")
ROUNDED_VARLEN = True
"""`write_rounded` for varlen blocks (the kept documents' finished rows): no fp32 out to fill and
round for them. On since the H200 run of 2026-12-06 (bench/results/nvidia_h200_2026-12-06:
gpu_work_staged.json, magi_replay_staged.json.gz, measured with PACK_GQA)."""
PACK_GQA = True
"""Fold the q heads of a KV head into a merging tile's rows, as upstream's forward does for GQA
(one K/V tile load serves them all; a short sequence fills its tiles). On since the H200 run of
2026-12-06 (with ROUNDED_VARLEN: the replays' forward attention 4-20% faster per rank,
bench/results/nvidia_h200_2026-12-06/magi_replay_staged.json.gz against magi_replay.json.gz)."""
PACK_GQA_DENSE_PARTIALS = False
"""Whether PACK_GQA also folds the q heads of the dense (not varlen) merging and first-write
blocks. Off: long dense rows fill their tiles anyway, and there the merging step ran faster
unfolded (one H100, 8K, 32:8, this epilogue, bench/results/nvidia_h100_2026-12-07_s30/: d 128
causal 0.960x upstream against 0.931x folded in the same run, full 0.964x against 0.962x; d 256
causal 0.935x against 0.930x). Unfolded rows also get the epilogue's L2 prefetch, which folded
ones skip."""


class Sm90ForwardPass:
    """`ForwardPass` on Hopper. The pass fixes dtype, head size, GQA ratio, scale and softcap; a
    step looks its kernel up by the block's window kind, varlen and first-write mode, and launches.
    A block that is the only one of its rows (`write_rounded`: a ring of one, the kept documents of
    the balanced layout) runs upstream's own kernel, whose epilogue writes 16-bit out.
    `pack_gqa`: fold q heads into the kernels' rows, where the GQA ratio divides the tile (None:
    `PACK_GQA` for varlen and sole blocks, and `PACK_GQA_DENSE_PARTIALS` with it for the others)."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, softmax_scale: float, softcap: float | None = None, pack_gqa: bool | None = None,
    ):
        qhead_per_kvhead = q.shape[-2] // k.shape[-2]
        self.config = (q.dtype, q.shape[-1], qhead_per_kvhead, softcap)
        self.pack_gqa = PACK_GQA if pack_gqa is None else pack_gqa
        self.pack_gqa_dense_partials = PACK_GQA and PACK_GQA_DENSE_PARTIALS if pack_gqa is None else pack_gqa
        self.writes_rounded_varlen = ROUNDED_VARLEN
        self.softmax_scale = softmax_scale
        self._kernels: dict[tuple, object] = {}

    def step(
        self, q, k, v, out_acc, lse_acc, *, mask: BandMask, accumulate: bool, varlen: VarlenRows | None = None,
        write_rounded: bool = False,
    ) -> None:
        if q.shape[-3] == 0 or k.shape[-3] == 0:
            return
        window = block_window(mask, q, k, varlen)
        key = (window.kind, varlen is not None, accumulate, v.shape[-1], write_rounded)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = forward_kernel(
                *self.config, window=window, varlen=varlen is not None, accumulate=accumulate, head_dim_v=v.shape[-1],
                write_rounded=write_rounded,
                pack_gqa=self.pack_gqa if varlen is not None or write_rounded else self.pack_gqa_dense_partials,
            )
        kernel(
            q, k, v, out_acc, lse_acc, self.softmax_scale, *varlen_arguments(varlen), None,
            window.left, window.right, None, None, NO_AUX, None, None,
        )


def forward_kernel(
    dtype: torch.dtype, head_dim: int, qhead_per_kvhead: int, softcap: float | None, *, window: Fa4Window, varlen: bool,
    accumulate: bool, head_dim_v: int | None = None, write_rounded: bool = False, pack_gqa: bool = False,
):
    """The compiled forward of one configuration (compiled at first use, then from the cache).
    The softcap is a constant of the kernel, as upstream compiles it. `head_dim_v`: v's, when it
    differs from q's and k's (MLA). `write_rounded`: upstream's own kernel, out in q's dtype and
    lse in fp32, for a block that is the only one of every row it selects. `pack_gqa` is taken
    where there is more than one q head per KV head and their count divides the tile."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    config = _tile_size_fwd_sm90(head_dim, head_dim_v, window.causal, window.local)
    pack_gqa = pack_gqa and qhead_per_kvhead > 1 and config.m_block_size % qhead_per_kvhead == 0
    key = (
        str(dtype), head_dim, head_dim_v, qhead_per_kvhead, *window.kind, varlen,
        config.m_block_size, config.n_block_size, config.mma_pv_is_rs, config.intra_wg_overlap, accumulate, softcap, write_rounded,
        pack_gqa,
    )
    if key not in _compiled:
        _compiled[key] = _compile(
            torch2cute_dtype_map[dtype], head_dim, qhead_per_kvhead, window, varlen, config, accumulate, softcap, head_dim_v,
            write_rounded, pack_gqa,
        )
    return _compiled[key]


def forward_partials_sm90(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_acc: torch.Tensor, lse_acc: torch.Tensor, *,
    mask: BandMask, softmax_scale: float, accumulate: bool, varlen: VarlenRows | None, softcap: float | None = None,
    pack_gqa: bool | None = None,
) -> None:
    """One block outside a ring call (tests, benchmarks): a pass of one step."""
    Sm90ForwardPass(q, k, softmax_scale, softcap, pack_gqa).step(q, k, v, out_acc, lse_acc, mask=mask, accumulate=accumulate, varlen=varlen)


def _compile(
    dtype, head_dim: int, qhead_per_kvhead: int, window: Fa4Window, varlen: bool, config, accumulate: bool, softcap: float | None,
    head_dim_v: int | None = None, write_rounded: bool = False, pack_gqa: bool = False,
):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    if write_rounded and accumulate:
        raise ValueError("write_rounded: a block that writes its rows, not one that accumulates")
    kernel_class, own = (FlashAttentionForwardSm90, {}) if write_rounded else (PartialsForwardSm90, dict(accumulate=accumulate))
    kernel = kernel_class(
        dtype,
        head_dim,
        head_dim_v,
        qhead_per_kvhead,
        is_causal=window.causal,
        is_local=window.local,
        pack_gqa=pack_gqa,
        tile_m=config.m_block_size,
        tile_n=config.n_block_size,
        num_stages=2,
        Q_in_regs=False,
        intra_wg_overlap=config.intra_wg_overlap,
        mma_pv_is_rs=config.mma_pv_is_rs,
        score_mod=None if softcap is None else create_softcap_scoremod(softcap),
        **own,
    )
    heads, kv_heads = cute.sym_int(), cute.sym_int()
    block = FakeBlockRows.make(varlen)
    rows_q, rows_k = block.rows_q, block.rows_k
    vector = 128 // dtype.width
    q = make_fake_tensor(dtype, (*rows_q, heads, head_dim), divisibility=vector)
    k, v = (make_fake_tensor(dtype, (*rows_k, kv_heads, dim), divisibility=vector) for dim in (head_dim, head_dim_v))
    if write_rounded:
        out = make_fake_tensor(dtype, (*rows_q, heads, head_dim_v), divisibility=vector)
        lse = make_fake_tensor(Float32, (*block.lead, heads, rows_q[-1]))
    else:
        out = make_fake_tensor(Float32, (*rows_q, heads, head_dim_v), divisibility=4)
        lse = make_fake_tensor(Float64, (*block.lead, heads, rows_q[-1]))
    window_left = Int32(0) if window.left is not None else None
    window_right = Int32(0) if window.right is not None else None
    return cute.compile(
        kernel, q, k, v, out, lse, Float32(1.0), *block.varlen_tensors, None,
        window_left, window_right, None, None, NO_AUX, None, None,
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
