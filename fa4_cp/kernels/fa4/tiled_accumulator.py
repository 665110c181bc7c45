"""Reading FA4's tiled fp32 dq accumulator back into (rows, head_dim) order, in fp32.

FA4's backward adds dq into fp32 buffers of whole tiles: tile t of a
sequence holds rows [t * tile, (t + 1) * tile) as tile * head_dim values in the order the MMA
registers hold them. Upstream's postprocess reorders a tile while rounding it to 16 bits; the
ring needs the fp32 values (several accumulators are summed). The
order is a fixed permutation per configuration: it is read off once by running upstream's
postprocess on tiles whose values are the digits (base 256, exact in bf16) of their own index.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from flash_attn.cute.interface import _bwd_postprocess_convert, torch2cute_dtype_map

DIGIT_BASE = 256  # every integer below 256 is exact in bf16


@dataclass(frozen=True)
class TileGeometry:
    """How one FA4 accumulator is tiled: the postprocess arguments that undo its order."""

    tile: int
    head_dim: int
    head_dim_rounded: int
    num_threads: int
    atom_layout: int
    swap_ab: bool
    hdim_multiple_of: int
    accum_order: object = None
    """Blackwell's storage order of the tiles (upstream's AccumTileOrder); None on Hopper."""
    use_2cta_instrs: bool = False
    """Blackwell: whether the kernel that fills it pairs CTAs (its dq comes per pair)."""

    def padded_rows(self, rows: int) -> int:
        return -(-rows // self.tile) * self.tile

    def varlen_padded_rows(self, total: int, sequences: int) -> int:
        """Rows of a varlen accumulator: every sequence starts on a tile of its own."""
        return (total + (sequences + 1) * self.tile - 1) // self.tile * self.tile

    def postprocess(self, accum: torch.Tensor, out: torch.Tensor, scale: float, arch: int, cu_seqlens=None, seqused=None) -> None:
        """Upstream's postprocess of an accumulator of this tiling: its values, times `scale`,
        written into `out` (rows, heads, head_dim) in `out`'s dtype, rounded once."""
        _bwd_postprocess_convert(
            accum, out, scale, cu_seqlens, seqused, arch, torch2cute_dtype_map[out.dtype], self.head_dim, self.tile, self.num_threads,
            self.atom_layout, self.swap_ab, use_2cta_instrs=self.use_2cta_instrs, fake_mode=False, hdim_multiple_of=self.hdim_multiple_of,
            accum_order=self.accum_order,
        )

    def untile(self, accum: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """(..., tiles * tile * head_dim_rounded) fp32 -> (..., tiles * tile, head_dim) fp32."""
        per_tile = accum.view(*accum.shape[:-1], -1, self.tile * self.head_dim_rounded)
        return per_tile[..., order].view(*accum.shape[:-1], -1, self.head_dim)


@functools.lru_cache(maxsize=32)
def tile_order(geometry: TileGeometry, arch: int, device: torch.device) -> torch.Tensor:
    """order[r * head_dim + c]: where value (row r, column c) of a tile sits in the tile's storage."""
    g = geometry
    size = g.tile * g.head_dim_rounded
    index = torch.arange(size, device=device)
    order = torch.zeros(g.tile * g.head_dim, dtype=torch.long, device=device)
    weight = 1
    while weight < size:
        accum = ((index // weight) % DIGIT_BASE).float().view(1, 1, size)
        digits = torch.empty(1, g.tile, 1, g.head_dim, dtype=torch.bfloat16, device=device)
        g.postprocess(accum, digits, 1.0, arch)
        order += digits.flatten().long() * weight
        weight *= DIGIT_BASE
    if order.unique().numel() != order.numel() or int(order.max()) >= size:
        raise RuntimeError("FA4's accumulator tile order is not a permutation: did the pinned flash-attn-4 change?")
    return order
