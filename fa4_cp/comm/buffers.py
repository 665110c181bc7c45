"""Persistent ring buffers: allocated once per channel, grown when a larger call comes, reused by
every later step and call (a training step's layers share them).

Every byte of a slot holds a finite value of the slot's dtype: an arena is zeroed when it is made,
and again when a call carves it into another dtype than the call before; a call only writes finite
values of its dtype into it (finite inputs' K and V, or their partial sums). So rows that a call
does not fill, stale or never written, are finite: a kernel may load them in a tile whose scores
it masks (a masked zero times a NaN would be NaN) without a per-call fill."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Allocate = Callable[[int, torch.device], torch.Tensor]
CARVED_KEPT = 16


def plain_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def aligned(nbytes: int, alignment: int = 256) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


class BufferPool:
    """`slots(channel, count, shape, dtype, device)`: `count` buffers of one shape, carved from one
    byte arena per channel. The arena only grows; `allocate` makes a new one (it may be collective,
    e.g. symmetric memory, so every rank must ask for the same sizes in the same order)."""

    def __init__(self, allocate: Allocate = plain_bytes):
        self._allocate = allocate
        self._arenas: dict[int, torch.Tensor] = {}
        self._dtypes: dict[int, torch.dtype] = {}  # channel -> the dtype its arena's bytes are finite in
        # the views of the last requests, made once per arena: carving costs host time at every call,
        # and a training step's calls ask for the same few shapes (packed batches vary: bounded)
        self._carved: dict[tuple, list[torch.Tensor]] = {}

    def nbytes(self) -> int:
        return sum(arena.numel() for arena in self._arenas.values())

    def has(self, channel: int) -> bool:
        return channel in self._arenas

    def arena(self, channel: int) -> torch.Tensor:
        return self._arenas[channel]

    def slots(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        slot_bytes = aligned(math.prod(shape) * dtype.itemsize)
        arena = self._arenas.get(channel)
        if arena is None or arena.device != device or arena.numel() < count * slot_bytes:
            arena = self._grow(channel, count * slot_bytes, device)
        if self._dtypes.get(channel) != dtype:
            # queued on the current stream: before any later hop into the arena, which a transport
            # posts behind the current stream's work (a peer's copy behind this rank's FREE signal)
            arena.zero_()
            self._dtypes[channel] = dtype
        key = (channel, count, tuple(shape), dtype)
        views = self._carved.pop(key, None)  # re-inserted last: the least recently asked for goes first
        if views is None:
            if len(self._carved) >= CARVED_KEPT:
                del self._carved[next(iter(self._carved))]
            views = [
                arena[i * slot_bytes : i * slot_bytes + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for i in range(count)
            ]
        self._carved[key] = views
        return list(views)

    def _grow(self, channel: int, nbytes: int, device: torch.device) -> torch.Tensor:
        # Allocate before dropping the old arena: a collective allocator first waits for the
        # transfers still queued on it.
        self._arenas[channel] = self._allocate(nbytes, device)
        self._dtypes.pop(channel, None)
        self._carved = {key: views for key, views in self._carved.items() if key[0] != channel}
        return self._arenas[channel]
