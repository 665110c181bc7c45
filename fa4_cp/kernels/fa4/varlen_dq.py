"""A varlen q side's dq accumulator in FA4's padded layout: sequence n starts at tile boundary
(cu_seqlens[n] + n * tile) // tile * tile. Each row's place in it (the read-back's row map), and
the tiles the side's kernels write (the only ones to start zeroed: the read-back reads no other),
made once per plan block, without a host sync."""

from __future__ import annotations

import threading
import weakref

import torch

from ..interface import VarlenRows


def varlen_side(varlen: VarlenRows, used: torch.Tensor, tile: int, total: int, padded: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A varlen q side's row map (`computed_row_map`) and the accumulator tiles its kernels write
    (`written_tiles`), made once per plan block (a training step's layers share them), without a
    host sync."""
    with _varlen_sides_lock:
        per_block = _varlen_sides.setdefault(varlen, {})
        if (tile, total) not in per_block:
            row_map = computed_row_map(varlen.cu_seqlens_q.long(), used.long(), tile, total)
            per_block[(tile, total)] = (row_map, written_tiles(varlen.q_sequences, tile, padded, row_map.device))
        return per_block[(tile, total)]


_varlen_sides: weakref.WeakKeyDictionary[VarlenRows, dict[tuple[int, int], tuple]] = weakref.WeakKeyDictionary()
_varlen_sides_lock = threading.Lock()


def written_tiles(sequences: tuple[tuple[int, int], ...] | None, tile: int, padded: int, device: torch.device) -> torch.Tensor | None:
    """The tiles of a varlen dq accumulator that a side's kernels write: sequence n's first
    ceil(rows / tile) from FA4's start, (first + n * tile) // tile. None where the sequences are
    not known on the host, or where the tiles are most of the accumulator (one fill is as cheap)."""
    if sequences is None:
        return None
    tiles = [
        start + block
        for n, (first, rows) in enumerate(sequences)
        for start in ((first + n * tile) // tile,)
        for block in range(-(-rows // tile))
    ]
    if 4 * len(tiles) >= 3 * (padded // tile):
        return None
    return torch.tensor(tiles, dtype=torch.long).to(device)


def zeroed_where_written(heads: int, padded: int, width: int, tile: int, written: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A varlen dq accumulator (heads, padded * width) whose tiles the kernels write start at zero;
    the read-back never reads the others."""
    if written is None:
        return torch.zeros(heads, padded * width, dtype=torch.float32, device=device)
    accum = torch.empty(heads, padded * width, dtype=torch.float32, device=device)
    accum.view(heads, padded // tile, tile * width).index_fill_(1, written, 0.0)
    return accum


def computed_row_map(cu: torch.Tensor, used: torch.Tensor, tile: int, total: int) -> torch.Tensor:
    rows = torch.arange(total, device=cu.device)
    sequence = torch.searchsorted(cu[1:], rows, right=True)  # the n with cu[n] <= row < cu[n + 1]
    inside = sequence < used.numel()
    sequence = sequence.clamp_(max=max(used.numel() - 1, 0))
    position = rows - cu[sequence]
    start = (cu[sequence] + sequence * tile) // tile * tile
    selected = inside & (position >= 0) & (position < used[sequence]) if used.numel() else inside  # rows before cu[0]: none
    return torch.where(selected, start + position, -1).to(torch.int32)
