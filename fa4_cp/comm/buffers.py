"""Persistent ring buffers: allocated once per channel, grown when a larger call comes, reused by
every later step and call (a training step's layers share them)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Allocate = Callable[[int, torch.device], torch.Tensor]


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
        return [
            arena[i * slot_bytes : i * slot_bytes + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for i in range(count)
        ]

    def _grow(self, channel: int, nbytes: int, device: torch.device) -> torch.Tensor:
        # Allocate before dropping the old arena: a collective allocator first waits for the
        # transfers still queued on it.
        self._arenas[channel] = self._allocate(nbytes, device)
        return self._arenas[channel]
