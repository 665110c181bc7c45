"""A simulated ring: W virtual ranks as threads of one process, for tests (W up to 72 and beyond).

Each virtual rank runs the real API, schedule and executor; only the transport is simulated.
Shifts meet at a barrier, so a rank that fails or never arrives breaks the ring for every rank
instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


class SimulatedRing:
    def __init__(self, world_size: int, timeout: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size: expected a positive rank count, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self._barrier = threading.Barrier(world_size)
        self._mailbox: dict[tuple[int, int], list] = {}
        self._lock = threading.Lock()

    def group(self, rank: int) -> SimulatedGroup:
        return SimulatedGroup(self, rank)

    def run(self, fn: Callable[[SimulatedGroup], Any]) -> list[Any]:
        """Run `fn(group)` on every virtual rank at once; results in rank order.

        The first exception of any rank is raised here once every rank has stopped.
        """
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(self.group(rank))
            except BaseException as error:  # noqa: BLE001 - reported to the caller below
                errors[rank] = error
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(rank,), name=f"sim-rank-{rank}") for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        if first is None:
            first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    def _meet(self) -> None:
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise threading.BrokenBarrierError("simulated ring broken: a rank failed or timed out") from None

    def _exchange(self, rank: int, channel: int, dst: int, payload: Any) -> Any:
        """Post `payload` for `dst`, wait for every rank, then take what was posted for `rank`."""
        with self._lock:
            self._mailbox[(dst, channel)] = payload
        self._meet()
        with self._lock:
            received = self._mailbox.pop((rank, channel))
        self._meet()
        return received

    def _gather(self, rank: int, value: Any) -> list[Any]:
        with self._lock:
            self._mailbox[(rank, "gather")] = value
        self._meet()
        gathered = [self._mailbox[(source, "gather")] for source in range(self.world_size)]
        self._meet()
        with self._lock:
            del self._mailbox[(rank, "gather")]
        return gathered


class SimulatedGroup:
    """One virtual rank's handle on a `SimulatedRing`; pass it as `group=`."""

    def __init__(self, ring: SimulatedRing, rank: int):
        self.ring = ring
        self.rank = rank
        self.world_size = ring.world_size


class _SimulatedShift:
    def __init__(self, group: SimulatedGroup, send: torch.Tensor, recv: torch.Tensor, offset: int, channel: int):
        self.group, self.send, self.recv, self.offset, self.channel = group, send, recv, offset, channel

    def wait(self) -> None:
        dst = (self.group.rank + self.offset) % self.group.world_size
        self.recv.copy_(self.group.ring._exchange(self.group.rank, self.channel, dst, self.send))


class SimulatedTransport:
    def __init__(self, group: SimulatedGroup):
        self.group = group
        self.rank = group.rank
        self.world_size = group.world_size

    def shift(self, send: torch.Tensor, recv: torch.Tensor, offset: int, channel: int = 0) -> _SimulatedShift:
        return _SimulatedShift(self.group, send, recv, offset, channel)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone() for t in self.group.ring._gather(self.rank, tensor)]
