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
import math
import torch
from flash_attn.cute.flash_bwd_sm100 import FlashAttentionBackwardSm100
from flash_attn.cute.interface import _bwd_postprocess_convert, _bwd_preprocess, torch2cute_dtype_map

from ..dkv_sum import finished_dkv
from ..interface import BandMask, VarlenRows, check_fixed_order
from .arguments import NO_AUX, kv_rows_past_k, varlen_arguments
from .backward_sm100 import HEAD_DIMS, TILE_M, TILE_N, backward_kernel_sm100, semaphore_shapes, two_ctas
from .masks import block_window
from .q_sides import QSide, side_for, summed_dq
from .tiled_accumulator import TileGeometry, tile_order
from .varlen_dq import varlen_row_map

SM100 = 100
POSTPROCESS_THREADS = 128  # upstream's dq postprocess on Blackwell


class Sm100BackwardPass:
    """The accumulating Blackwell backward (`takes` says for which calls; the others run
    upstream's backward per step, passes_sm100.UpstreamBackwardPass)."""

    @staticmethod
    def takes(q: torch.Tensor, dout: torch.Tensor) -> bool:
        return (q.shape[-1], dout.shape[-1]) in HEAD_DIMS

    def __init__(self, q, out, lse, dout, dlse, softmax_scale: float, softcap: float | None = None, deterministic: bool = False):
        self.q, self.out, self.dout, self.softmax_scale, self.softcap = q, out, dout, softmax_scale, softcap
        self.deterministic = deterministic
        self.dk_scale = softmax_scale  # the kernel adds dK unscaled
        self.lse = lse.float()
        self.dlse = None if dlse is None else dlse.float()
        self.geometry = _dq_geometry(q.shape[-1])
        self.sides: dict[tuple, QSide] = {}
        self.whole_dq: torch.Tensor | None = None
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
        side = self._side(q_rows, varlen)
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
        """Deterministic mode: upstream's turn counters, zeroed for each launch (one allocation)."""
        if not self.deterministic:
            return (None, None, None)
        lead = (len(varlen.computed_prefix.seqused_q),) if varlen is not None else q.shape[:1]  # the sequences launched
        shapes = semaphore_shapes(lead, q.shape[-2], k.shape[-2], q.shape[-3], k.shape[-3], k.shape[-1])
        counters = torch.zeros(sum(math.prod(shape) for shape in shapes), dtype=torch.int32, device=q.device)
        return tuple(part.view(shape) for part, shape in zip(counters.split([math.prod(shape) for shape in shapes]), shapes))

    def dq(self) -> torch.Tensor:
        owned = [side for side in self.sides.values() if side.owns_accum]
        if self.whole_dq is not None and not owned:
            return self._postprocessed(self.whole_dq, None, None, torch.empty_like(self.q))
        if self.whole_dq is None and len(owned) == 1 and owned[0].row_map is not None:
            side = owned[0]  # rows of no sequence get no gradient: the postprocess writes only the sequences'
            return self._postprocessed(side.dq_accum, side.cu_seqlens, side.seqused, torch.zeros_like(self.q))
        order = tile_order(self.geometry, SM100, self.q.device)
        return summed_dq(self.q, self.whole_dq, owned, self.geometry, order, self.softmax_scale)

    def finish_dkv(self, local, travelled, k, v, indexed=()):
        return finished_dkv(local, travelled, k, v, self.dk_scale, indexed=indexed)

    def _postprocessed(self, accum: torch.Tensor, cu_seqlens, seqused, dq: torch.Tensor) -> torch.Tensor:
        """One accumulator holding all of dq, read back into `dq`, scaled and rounded once to q's
        dtype by upstream's postprocess, as upstream's own backward does."""
        g = self.geometry
        _bwd_postprocess_convert(
            accum, dq, self.softmax_scale, cu_seqlens, seqused, SM100, torch2cute_dtype_map[dq.dtype], g.head_dim, g.tile,
            g.num_threads, g.atom_layout, g.swap_ab, use_2cta_instrs=g.use_2cta_instrs, fake_mode=False, hdim_multiple_of=g.hdim_multiple_of,
            accum_order=g.accum_order,
        )
        return dq

    def _side(self, q_rows: slice, varlen: VarlenRows | None) -> QSide:
        return side_for(self.sides, q_rows, varlen, self._new_side)

    def _new_side(self, q_rows: slice, varlen: VarlenRows | None) -> QSide:
        q, g = self.q, self.geometry
        lead = q.shape[:-3]
        if varlen is None:
            start, stop, _ = q_rows.indices(q.shape[1])
            rows, padded, row_map, cu, used = slice(start, stop), g.padded_rows(stop - start), None, None, None
            shared = start % g.tile == 0
        else:  # statistics and read-back over the rows any block of the side selects
            rows, cu, shared = slice(None), varlen.cu_seqlens_q, False
            used = varlen.seqused_q if varlen.seqused_q_all is None else varlen.seqused_q_all
            padded = g.varlen_padded_rows(q.shape[0], used.shape[0])
            row_map = varlen_row_map(varlen, used, g.tile, q.shape[0])
        width = g.head_dim_rounded
        if shared:
            dq_accum = self._whole_dq()[..., start * width : (start + padded) * width]
        else:  # zeroed by the preprocess below at every tile of the side's rows (all that its kernels write and dq reads)
            dq_accum = torch.empty(*lead, q.shape[-2], padded * width, dtype=torch.float32, device=q.device)
        lse_log2, dpsum = (torch.empty(*lead, q.shape[-2], padded, dtype=torch.float32, device=q.device) for _ in range(2))
        dout = self.dout[..., rows, :, :]
        _bwd_preprocess(
            self.out[..., rows, :, :], dout, dpsum, self.lse[..., rows], lse_log2, None if shared else dq_accum, cu, used,
            None if self.dlse is None else self.dlse[..., rows], torch2cute_dtype_map[q.dtype], q.shape[-1], self.dout.shape[-1],
            g.tile, fake_mode=False, hdim_multiple_of=g.hdim_multiple_of,
        )
        return QSide(rows, q[..., rows, :, :], dout, lse_log2, dpsum, dq_accum, not shared, row_map, cu, used)

    def _whole_dq(self) -> torch.Tensor:
        """The shard's shared dq accumulator, zeroed when first made."""
        if self.whole_dq is None:
            q = self.q
            padded = self.geometry.padded_rows(q.shape[1])
            self.whole_dq = torch.zeros(q.shape[0], q.shape[2], padded * self.geometry.head_dim_rounded, dtype=torch.float32, device=q.device)
        return self.whole_dq


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
