"""The q sides of a ring call's backward on FA4, Hopper's and Blackwell's alike.

A q side is a distinct set of q rows the call's steps use: the whole shard, one lane run, or a
varlen block's sequences. Each has its statistics (lse * log2(e), delta) in the padded layout the
kernel reads, and a tiled fp32 dq accumulator: the shard's shared one (dense sides that start on
a tile boundary) or its own. `summed_dq` reads every accumulator back through its tile order and
sums them in fp32, where no one-pass read-back applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

from ..interface import VarlenRows
from .tiled_accumulator import TileGeometry


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


def side_for(sides: dict, q_rows: slice, varlen: VarlenRows | None, make: Callable[[slice, VarlenRows | None], QSide]) -> QSide:
    """The q side a block's rows belong to, made (`make`) at its first block."""
    if varlen is None:
        key = (q_rows.start, q_rows.stop)
    elif varlen.seqused_q_all is not None:  # blocks over one cu_seqlens_q share a side
        key = varlen.cu_seqlens_q.data_ptr()
    else:
        key = (varlen.cu_seqlens_q.data_ptr(), varlen.seqused_q.data_ptr())
    side = sides.get(key)
    if side is None:
        side = sides[key] = make(q_rows, varlen)
    return side


def summed_dq(
    q: torch.Tensor, whole_dq: torch.Tensor | None, owned: list[QSide], geometry: TileGeometry, order: torch.Tensor, scale: float,
) -> torch.Tensor:
    """dq in fp32, scaled: the shard's shared accumulator (if any) and every side's own, each
    read back through the tile order (`tiled_accumulator.tile_order`), at its rows."""
    if whole_dq is not None:
        dq = rearrange(geometry.untile(whole_dq, order)[..., : q.shape[-3], :], "b h s d -> b s h d").contiguous()
    else:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for side in owned:
        values = geometry.untile(side.dq_accum, order)
        if side.row_map is None:
            dq[:, side.rows] += rearrange(values[..., : dq[:, side.rows].shape[1], :], "b h s d -> b s h d")
        else:
            index = (side.row_map >= 0).nonzero().squeeze(1)
            dq.index_add_(0, index, rearrange(values[:, side.row_map[index].long()], "h s d -> s h d"))
    return dq.mul_(scale)
