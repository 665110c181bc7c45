"""One ring call's backward on Blackwell (see `BackwardPass`), around the accumulating kernel.

UNTESTED on a GPU (backward_sm100.py says why, and which tests run it on a Blackwell GPU).

Once per call and per distinct set of q rows the steps use (a "q side": the whole shard, one
lane run, or a varlen block's sequences), upstream's preprocess computes delta = rowsum(dout *
out) - dlse and lse * log2(e) in the padded layout the kernel reads. Every step launches one
kernel: it adds its dq into an fp32 accumulator and its dK/dV straight into the caller's fp32
buffers (unscaled). Dense q sides that start on a tile boundary share one accumulator for the
whole shard, zeroed once; any other side has its own, which its preprocess zeroes. `dq` reads
the accumulators back once, rounded once to q's dtype: upstream's postprocess where one
accumulator holds all of dq (a ring of one, a dense ring's sides, a single varlen side), else in
fp32 through the accumulators' tile order, summed. dK/dV are finished in torch (dkv_sum.py).
"""

from __future__ import annotations

import functools

import torch
from flash_attn.cute.flash_bwd_sm100 import FlashAttentionBackwardSm100

from ..dkv_sum import finished_dkv
from ..interface import BandMask, VarlenRows, check_fixed_order
from .arguments import NO_AUX, kv_rows_past_k, turn_counters, varlen_arguments
from .backward_sm100 import HEAD_DIMS, TILE_M, TILE_N, backward_kernel_sm100, two_ctas
from .masks import block_window
from .q_sides import DqSides
from .tiled_accumulator import TileGeometry, tile_order

SM100 = 100
POSTPROCESS_THREADS = 128  # upstream's dq postprocess on Blackwell


class Sm100BackwardPass:
    """The accumulating Blackwell backward (`takes` says for which calls; the others run
    upstream's backward per step, passes_sm100.UpstreamBackwardPass)."""

    @staticmethod
    def takes(q: torch.Tensor, dout: torch.Tensor) -> bool:
        return (q.shape[-1], dout.shape[-1]) in HEAD_DIMS

    def __init__(self, q, out, lse, dout, dlse, softmax_scale: float, softcap: float | None = None, deterministic: bool = False):
        self.q, self.softmax_scale, self.softcap = q, softmax_scale, softcap
        self.deterministic = deterministic
        self.dk_scale = softmax_scale  # the kernel adds dK unscaled
        self.lse = lse.float()
        self.dlse = None if dlse is None else dlse.float()
        self.geometry = _dq_geometry(q.shape[-1])
        self.dq_sides = DqSides(q, out, dout, self.lse, self.dlse, self.geometry)
        self._kernels: dict[tuple, object] = {}

    def can_write_first(self, k: torch.Tensor) -> bool:
        return False  # the epilogue only adds: chains start zeroed

    def can_write_rounded(self, k: torch.Tensor) -> bool:
        return False

    def step(
        self, k, v, dk_acc, dv_acc, *, q_rows: slice, mask: BandMask, varlen: VarlenRows | None = None, write_first: bool = False,
        write_rounded: bool = False,
    ) -> None:
        if write_first or write_rounded:
            raise ValueError("the accumulating Blackwell backward adds every block: no write_first or write_rounded")
        check_fixed_order(varlen, self.deterministic)
        if kv_rows_past_k(varlen, k) is not None:
            raise ValueError("varlen entries whose KV rows exceed k's in total: Blackwell's backward covers k's rows once")
        side = self.dq_sides.side(q_rows, varlen)
        if side.q.shape[-3] == 0 or k.shape[-3] == 0:
            return
        window = block_window(mask, side.q, k, varlen)
        key = (window.kind, varlen is not None)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = backward_kernel_sm100(
                side.q.dtype, k.shape[-1], v.shape[-1], side.q.shape[-2] // k.shape[-2], window, varlen is not None, self.softcap,
                self.deterministic,
            )
        kernel(
            side.q, k, v, side.dout, side.lse_log2, side.dpsum, side.dq_accum, dk_acc, dv_acc, self.softmax_scale,
            *varlen_arguments(varlen), window.left, window.right, *self._semaphores(side.q, k, varlen), NO_AUX, None, None,
        )

    def _semaphores(self, q: torch.Tensor, k: torch.Tensor, varlen: VarlenRows | None) -> tuple:
        """Deterministic mode: upstream's turn counters, zeroed for each launch."""
        if not self.deterministic:
            return (None, None, None)
        return turn_counters(q, k, varlen, TILE_M, TILE_N, 2 if two_ctas(k.shape[-1]) else 1)

    def dq(self) -> torch.Tensor:
        whole, owned = self.dq_sides.whole, self.dq_sides.owned()
        # one accumulator holds all of dq: upstream's postprocess reads it back, scaled and rounded
        # once to q's dtype, as upstream's own backward does
        if whole is not None and not owned:
            dq = torch.empty_like(self.q)
            self.geometry.postprocess(whole, dq, self.softmax_scale, SM100)
            return dq
        if whole is None and len(owned) == 1 and owned[0].row_map is not None:
            side = owned[0]
            dq = torch.zeros_like(self.q)  # rows of no sequence get no gradient: the postprocess writes only the sequences'
            self.geometry.postprocess(side.dq_accum, dq, self.softmax_scale, SM100, side.cu_seqlens, side.seqused)
            return dq
        return self.dq_sides.summed(tile_order(self.geometry, SM100, self.q.device), self.softmax_scale)

    def finish_dkv(self, local, travelled, k, v, indexed=()):
        return finished_dkv(local, travelled, k, v, self.dk_scale, indexed=indexed)


@functools.cache
def _dq_geometry(head_dim: int) -> TileGeometry:
    """How the accumulating kernel's dq accumulator is tiled (upstream's Blackwell dq layout for
    its tiles and CTA pairing at this head_dim)."""
    pair = two_ctas(head_dim)
    dq_order, _ = FlashAttentionBackwardSm100.accum_tile_orders(pair, TILE_N)
    return TileGeometry(
        TILE_M, head_dim=head_dim, head_dim_rounded=-(-head_dim // 32) * 32, num_threads=POSTPROCESS_THREADS, atom_layout=1,
        swap_ab=False, hdim_multiple_of=32, accum_order=dq_order, use_2cta_instrs=pair,
    )
