"""The merging forward's prior out, read while a tile's main loop runs instead of in its epilogue.

As a tile's first block starts, each consumer thread copies from memory into shared memory
(cp.async) the fp32 values of out that its epilogue will merge into: its MMA fragment's rows of the
tile. The epilogue then reads them there, a main loop later, instead of waiting on memory. A thread
reads only the values it copied itself, so its own wait (cp.async.wait_group) is all the
synchronisation there is, and a thread's copies for the next tile follow its reads of this one.
The buffer lays the consumer threads' values side by side, pair by pair (thread t's p-th pair of
columns at pair p x threads + t), so that a warp's copies and reads of one pair fall on
consecutive banks.

It takes a tile's worth of fp32 (64 KiB at 128 x 128) beside upstream's Q, K and V stages; a
kernel whose storage leaves no room for it keeps the epilogue's reads (`fits`).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass.cute.nvgpu import cpasync
from cutlass.memory import SmemAllocator

# What a block may keep of the SM's shared memory (sm_90; sm_100 has as much), less a margin for the
# barriers and alignment of upstream's storage
SHARED_MEMORY_BYTES = SmemAllocator.capacity_in_bytes("sm_90") - 2048


def fits(storage_bytes: int, tile_m: int, tile_hdimv: int) -> bool:
    """Whether a buffer of the tile's fp32 out fits beside `storage_bytes` of upstream's storage."""
    return storage_bytes + tile_m * tile_hdimv * Float32.width // 8 <= SHARED_MEMORY_BYTES


class PriorReads:
    """The shared buffer of one kernel's consumer threads (made while the kernel is traced)."""

    def __init__(self, threads: int, rows: int, columns: int):
        self.threads, self.rows, self.columns = threads, rows, columns
        pairs = columns // 2
        # (thread, row, (column within its pair, pair)): thread t's pair p of row m at pair
        # (m pairs + p) threads + t
        layout = cute.make_layout((threads, rows, (2, pairs)), stride=(2, columns * threads, (1, 2 * threads)))
        self.buffer = SmemAllocator().allocate_tensor(Float32, layout, byte_alignment=128)
        self.atom = cute.make_copy_atom(cpasync.CopyG2SOp(), Float32, num_bits_per_copy=2 * Float32.width)

    def slot(self, thread: cutlass.Int32) -> cute.Tensor:
        """`thread`'s values: (rows, columns) as its fragment holds them."""
        return self.buffer[thread, None, None]

    @cute.jit
    def start(self, tOgO: cute.Tensor, tOcO: cute.Tensor, rows_in_tile: cutlass.Int32, thread: cutlass.Int32):
        """Copy the thread's rows of out (tOgO, by row then column, as the fragment) that lie in
        the tile (tOcO's rows below `rows_in_tile`) into its slot; then commit them as one group."""
        slot = self.slot(thread)
        for m in cutlass.range_constexpr(self.rows):
            if tOcO[m, 0][0] < rows_in_tile:
                for pair in cutlass.range_constexpr(self.columns // 2):
                    cute.copy(self.atom, _pair(tOgO, m, pair), _pair(slot, m, pair))
        cute.arch.cp_async_commit_group()

    @cute.jit
    def wait(self):
        """Until the thread's copies have landed."""
        cute.arch.cp_async_wait_group(0)


def _pair(rows: cute.Tensor, m: int, pair: int) -> cute.Tensor:
    """Values 2 pair and 2 pair + 1 of row m of a fragment-ordered (rows, columns) tensor."""
    return cute.logical_divide(rows[m, None], cute.make_layout(2))[None, pair]
