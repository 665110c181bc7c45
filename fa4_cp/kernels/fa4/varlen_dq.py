"""A varlen q side's place in FA4's padded dq accumulator layout: sequence n starts at tile
boundary (cu_seqlens[n] + n * tile) // tile * tile. Each row's place there (the read-back's row
map), made once per plan block, without a host sync. The accumulator's tiles start zeroed by
FA4's preprocess, which visits every tile of each sequence's used rows."""

from __future__ import annotations

import threading
import weakref

import torch

from ..interface import VarlenRows


def varlen_row_map(varlen: VarlenRows, used: torch.Tensor, tile: int, total: int) -> torch.Tensor:
    """A varlen q side's row map (`computed_row_map`), made once per plan block (a training step's
    layers share it), without a host sync."""
    with _row_maps_lock:
        per_block = _row_maps.setdefault(varlen, {})
        if (tile, total) not in per_block:
            per_block[(tile, total)] = computed_row_map(varlen.cu_seqlens_q.long(), used.long(), tile, total)
        return per_block[(tile, total)]


_row_maps: weakref.WeakKeyDictionary[VarlenRows, dict[tuple[int, int], torch.Tensor]] = weakref.WeakKeyDictionary()
_row_maps_lock = threading.Lock()


def computed_row_map(cu: torch.Tensor, used: torch.Tensor, tile: int, total: int) -> torch.Tensor:
    rows = torch.arange(total, device=cu.device)
    sequence = torch.searchsorted(cu[1:], rows, right=True)  # the n with cu[n] <= row < cu[n + 1]
    inside = sequence < used.numel()
    sequence = sequence.clamp_(max=max(used.numel() - 1, 0))
    position = rows - cu[sequence]
    start = (cu[sequence] + sequence * tile) // tile * tile
    selected = inside & (position >= 0) & (position < used[sequence]) if used.numel() else inside  # rows before cu[0]: none
    return torch.where(selected, start + position, -1).to(torch.int32)
