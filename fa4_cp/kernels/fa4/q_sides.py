"""The q sides of a ring call's backward on FA4, Hopper's and Blackwell's alike.

A q side is a distinct set of q rows the call's steps use: the whole shard, one lane run, or a
varlen block's sequences. Each has its statistics (lse * log2(e), delta) in the padded layout the
kernel reads, and a tiled fp32 dq accumulator: the shard's shared one (dense sides that start on
a tile boundary) or its own. `DqSides.summed` reads every accumulator back through its tile order
and sums them in fp32, where no one-pass read-back applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from flash_attn.cute.interface import _bwd_preprocess, torch2cute_dtype_map

from ..interface import VarlenRows
from .tiled_accumulator import TileGeometry
from .varlen_dq import varlen_row_map


@dataclass
class QSide:
    rows: slice  # dense rows of q, or everything for varlen
    q: torch.Tensor  # those rows of q and of dout
    dout: torch.Tensor
    lse_log2: torch.Tensor
    dpsum: torch.Tensor
    dq_accum: torch.Tensor
    owns_accum: bool
    row_map: torch.Tensor | None  # varlen: each row's padded row in the accumulator, -1 where unselected
    cu_seqlens: torch.Tensor | None = None  # varlen: the side's sequences, as its preprocess took them
    seqused: torch.Tensor | None = None


class DqSides:
    """A call's q sides, each made at its first block (`side`): upstream's preprocess computes its
    statistics and zeroes its own accumulator at every tile of its rows (all that its kernels
    write and its read-back reads); the shard's shared accumulator (`whole`) is zeroed once, when
    made. `geometry`: the backward kernel's dq tiling."""

    def __init__(self, q, out, dout, lse, dlse, geometry: TileGeometry):
        self.q, self.out, self.dout, self.lse, self.dlse, self.geometry = q, out, dout, lse, dlse, geometry
        self.sides: dict[object, QSide] = {}
        self.whole: torch.Tensor | None = None

    def side(self, q_rows: slice, varlen: VarlenRows | None) -> QSide:
        """The q side a block's rows belong to."""
        if varlen is None:
            key = (q_rows.start, q_rows.stop)
        elif varlen.seqused_q_all is not None:  # blocks over one cu_seqlens_q share a side
            key = varlen.cu_seqlens_q.data_ptr()
        else:
            key = (varlen.cu_seqlens_q.data_ptr(), varlen.seqused_q.data_ptr())
        side = self.sides.get(key)
        if side is None:
            side = self.sides[key] = self._new(q_rows, varlen)
        return side

    def owned(self) -> list[QSide]:
        """The sides with an accumulator of their own."""
        return [side for side in self.sides.values() if side.owns_accum]

    def summed(self, order: torch.Tensor, scale: float) -> torch.Tensor:
        """dq in fp32, scaled: the shared accumulator (if any) and every side's own, each read back
        through the tile order (`tiled_accumulator.tile_order`), at its rows."""
        q, g = self.q, self.geometry
        if self.whole is not None:
            dq = rearrange(g.untile(self.whole, order)[..., : q.shape[-3], :], "b h s d -> b s h d").contiguous()
        else:
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        for side in self.owned():
            values = g.untile(side.dq_accum, order)
            if side.row_map is None:
                dq[:, side.rows] += rearrange(values[..., : dq[:, side.rows].shape[1], :], "b h s d -> b s h d")
            else:
                index = (side.row_map >= 0).nonzero().squeeze(1)
                dq.index_add_(0, index, rearrange(values[:, side.row_map[index].long()], "h s d -> s h d"))
        return dq.mul_(scale)

    def _new(self, q_rows: slice, varlen: VarlenRows | None) -> QSide:
        q, g = self.q, self.geometry
        lead, width = q.shape[:-3], g.head_dim_rounded
        if varlen is None:
            start, stop, _ = q_rows.indices(q.shape[1])
            rows, padded = slice(start, stop), g.padded_rows(stop - start)
            shared = start % g.tile == 0
            row_map, cu, used = None, None, None
        else:  # statistics and read-back over the rows any block of the side selects
            rows, cu, shared = slice(None), varlen.cu_seqlens_q, False
            used = varlen.seqused_q if varlen.seqused_q_all is None else varlen.seqused_q_all
            padded = g.varlen_padded_rows(q.shape[0], used.shape[0])
            row_map = varlen_row_map(varlen, used, g.tile, q.shape[0])
        if shared:
            accum = _of_rows(self._whole(), slice(start * width, (start + padded) * width), -1)
        else:  # zeroed by the preprocess below
            accum = torch.empty(*lead, q.shape[-2], padded * width, dtype=torch.float32, device=q.device)
        lse_log2, dpsum = (torch.empty(*lead, q.shape[-2], padded, dtype=torch.float32, device=q.device) for _ in range(2))
        side_q, side_out, side_dout = (_of_rows(t, rows, -3) for t in (q, self.out, self.dout))
        _bwd_preprocess(
            side_out, side_dout, dpsum, _of_rows(self.lse, rows, -1), lse_log2, None if shared else accum,
            cu, used, None if self.dlse is None else _of_rows(self.dlse, rows, -1),
            torch2cute_dtype_map[q.dtype], q.shape[-1], self.dout.shape[-1], g.tile,
            fake_mode=False, hdim_multiple_of=g.hdim_multiple_of,
        )
        return QSide(rows, side_q, side_dout, lse_log2, dpsum, accum, not shared, row_map, cu, used)

    def _whole(self) -> torch.Tensor:
        if self.whole is None:
            q = self.q
            padded = self.geometry.padded_rows(q.shape[1])
            self.whole = torch.zeros(q.shape[0], q.shape[2], padded * self.geometry.head_dim_rounded, dtype=torch.float32, device=q.device)
        return self.whole


def _of_rows(t: torch.Tensor, rows: slice, dim: int) -> torch.Tensor:
    """`rows` of `t` along `dim`: `t` itself where they are all of its rows (a ring of one, a dense
    ring's whole shard, a varlen side), since each view made costs host time on every call."""
    start, stop, _ = rows.indices(t.shape[dim])
    if start == 0 and stop == t.shape[dim]:
        return t
    return t.narrow(dim, start, stop - start)
