"""One ring call's backward on Hopper (see `BackwardPass`), around FA4's backward kernel.

Once per call and per distinct set of q rows the steps use (a "q side": the whole shard, or
one lane run), FA4's preprocess computes delta = rowsum(dout * out) - dlse and lse * log2(e) in
the padded layout the kernel reads. Every step's kernel then adds its dq into the q side's fp32
tiled accumulator; dense q sides that start on a tile boundary share one accumulator for the
whole shard (zeroed once); any other side has its own, which the same preprocess zeroes at the
tiles of the side's rows, all that its kernels write and its read-back reads (no fill kernel). `dq`
reads the accumulators back once, rounded once to q's dtype: with upstream's postprocess when one
accumulator holds all of dq, with one pass over the varlen sides' accumulators (dq_readback.py)
for packed documents, else in fp32 and summed. dK/dV go straight from the kernel into the
caller's fp32 buffers (backward_sm90.py), unscaled: a step launches one kernel and nothing else;
`finish_dkv` sums, scales and rounds them in one pass (dkv_finish.py). A sole block with one q
head per kv head writes them finished instead, through upstream's own kernel (`write_rounded`).
The pass binds the tile configuration and each kernel it uses once; a step looks its kernel up
by window kind and launches.
"""

from __future__ import annotations

import functools
import torch

from ..dkv_sum import finished_dkv
from ..interface import KV_TILE_OVERHANG, BandMask, VarlenRows, check_fixed_order
from .arguments import NO_AUX, kv_rows_past_k, turn_counters, varlen_arguments
from .backward_sm90 import BackwardTiles, backward_kernel
from .dkv_finish import finish_dkv_cuda
from .dq_readback import MAX_SIDES, read_back_dq
from .masks import block_window
from .q_sides import DqSides, QSide
from .tiled_accumulator import TileGeometry, tile_order

SM90 = 90


class Sm90BackwardPass:
    def __init__(
        self, q, out, lse, dout, dlse, softmax_scale: float, softcap: float | None = None, deterministic: bool = False,
    ):
        self.q, self.dout, self.softmax_scale, self.softcap = q, dout, softmax_scale, softcap
        self.deterministic = deterministic
        self.dk_scale = softmax_scale  # the kernel adds dK unscaled
        self.lse = lse.float()
        self.dlse = None if dlse is None else dlse.float()
        self.tiles = tiles = BackwardTiles.for_head_dim(q.shape[-1], dout.shape[-1])
        self.dq_tiles = _dq_geometry(tiles)
        self.dq_sides = DqSides(q, out, dout, self.lse, self.dlse, self.dq_tiles)
        self._kernels: dict[tuple, object] = {}

    def step(
        self, k, v, dk_acc, dv_acc, *, q_rows: slice, mask: BandMask, varlen: VarlenRows | None = None, write_first: bool = False,
        write_rounded: bool = False,
    ) -> None:
        side = self.dq_sides.side(q_rows, varlen)
        q = side.q
        if write_first and (varlen is not None or not self.can_write_first(k)):
            raise ValueError("write_first: dense blocks, and GQA only when deterministic")
        if write_rounded and (varlen is not None or write_first or not self.can_write_rounded(k)):
            raise ValueError("write_rounded: a dense block, one q head per kv head, v of k's head_dim")
        check_fixed_order(varlen, self.deterministic)
        grid_rows = _shared_kv_rows(varlen, k, v)
        if q.shape[-3] == 0 or k.shape[-3] == 0:
            if write_first or write_rounded:
                dk_acc.zero_()
                dv_acc.zero_()
            return
        # the q side (its statistics and dq accumulator) is the whole block's; the launch lists
        # only the sequences up to the last it computes, at the same offsets (varlen_arguments)
        window = block_window(mask, q, k, varlen)
        key = (window.kind, varlen is not None, write_first, write_rounded, grid_rows is not None)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = backward_kernel(
                self.tiles, q.dtype, q.shape[-2] // k.shape[-2], window, varlen is not None, self.softcap,
                write_first=write_first, deterministic=self.deterministic, write_rounded=write_rounded, shared_kv=grid_rows is not None,
            )
        kernel(
            q, k, v, side.dout, side.lse_log2, side.dpsum, side.dq_accum, dk_acc, dv_acc, self.softmax_scale, *varlen_arguments(varlen),
            window.left, window.right, *self._semaphores(q, k, varlen), NO_AUX, None, None, *(() if write_rounded else (grid_rows,)),
        )

    def can_write_first(self, k: torch.Tensor) -> bool:
        # the q heads of a kv head race to their rows, unless they take turns
        return self.q.shape[-2] == k.shape[-2] or self.deterministic

    def can_write_rounded(self, k: torch.Tensor) -> bool:
        # upstream's own epilogue writes 16-bit dK/dV for one q head per kv head
        return self.q.shape[-2] == k.shape[-2] and self.dout.shape[-1] == self.q.shape[-1]

    def _semaphores(self, q: torch.Tensor, k: torch.Tensor, varlen: VarlenRows | None) -> tuple:
        """Deterministic mode: upstream's turn counters, zeroed for each launch."""
        if not self.deterministic:
            return (None, None, None)
        return turn_counters(q, k, varlen, self.tiles.tile_m, self.tiles.tile_n)

    def dq(self) -> torch.Tensor:
        whole, owned = self.dq_sides.whole, self.dq_sides.owned()
        if whole is not None and not owned:
            # one accumulator holds all of dq: upstream's postprocess reads it back, scaled and
            # rounded once to q's dtype, as upstream's own backward does
            dq = torch.empty_like(self.q)
            self.dq_tiles.postprocess(whole, dq, self.softmax_scale, SM90)
            return dq
        if whole is None and 0 < len(owned) <= MAX_SIDES and all(side.row_map is not None for side in owned):
            return self._read_back_varlen(owned)
        return self.dq_sides.summed(tile_order(self.dq_tiles, SM90, self.q.device), self.softmax_scale)

    def finish_dkv(self, local, travelled, k, v, indexed=()):
        if k.shape[-1] != v.shape[-1]:  # the one-pass finish takes one width; MLA's two go through torch
            return finished_dkv(local, travelled, k, v, self.dk_scale, indexed=indexed)
        return finish_dkv_cuda(local, travelled, k, self.dk_scale, indexed)

    def _read_back_varlen(self, sides: list[QSide]) -> torch.Tensor:
        """The varlen sides' accumulators in one pass (dq_readback.py), scaled and rounded once."""
        dq = torch.empty_like(self.q)
        row_maps = torch.stack([side.row_map for side in sides])
        order = _int32_tile_order(self.dq_tiles, self.q.device)
        read_back_dq([side.dq_accum for side in sides], row_maps, order, self.dq_tiles, self.softmax_scale, dq)
        return dq


def _shared_kv_rows(varlen: VarlenRows | None, k: torch.Tensor, v: torch.Tensor) -> int | None:
    """The kv rows a launch's grid must cover where its entries' KV rows overlap beyond K's rows
    (None: K's rows). The kernel then reads up to a tile past K's last row: ValueError unless
    K's and V's storage holds `KV_TILE_OVERHANG` rows there (their values are the caller's to
    keep finite)."""
    rows = kv_rows_past_k(varlen, k)
    if rows is None:
        return None
    for name, t in (("k", k), ("v", v)):
        if t.untyped_storage().nbytes() // t.element_size() < t.storage_offset() + (t.shape[-3] + KV_TILE_OVERHANG) * t.stride(-3):
            raise ValueError(
                f"varlen entries over shared KV rows: {name} needs {KV_TILE_OVERHANG} rows of its storage past its last row "
                f"(the kernel's tile overhang), got a tensor that ends its storage"
            )
    return rows


@functools.cache
def _dq_geometry(tiles: BackwardTiles) -> TileGeometry:
    """How the dq accumulator of a tile configuration is tiled."""
    config = tiles.config
    return TileGeometry(
        tiles.tile_m, num_threads=128 if config.dQ_single_wg else config.num_wg * 128, atom_layout=config.AtomLayoutMdQ,
        swap_ab=config.dQ_swapAB, head_dim=tiles.head_dim, head_dim_rounded=tiles.head_dim_rounded,
        hdim_multiple_of=tiles.hdim_multiple_of,
    )


@functools.lru_cache(maxsize=8)
def _int32_tile_order(geometry: TileGeometry, device: torch.device) -> torch.Tensor:
    """The tile order as the read-back kernel takes it, converted once, not once per call."""
    return tile_order(geometry, SM90, device).to(torch.int32)
