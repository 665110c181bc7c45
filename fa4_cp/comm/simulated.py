"""A simulated ring: W virtual ranks as threads of one process, for tests (W up to 72 and beyond).

Each virtual rank runs the real API, schedule and executor; only the group and its transport are
simulated. A shift posts a copy of the send buffer to a per-(source, destination, channel) queue,
so the sender may reuse its buffer at once; `wait` takes the incoming copy. Making a rank's
transport is a collective (every rank joins), as it is between GPUs. A rank that fails aborts the
ring: every other rank raises instead of hanging. The ring counts each rank's collectives (all-
gathers, shifts, transport set-up), so tests can see what a call communicated.

Virtual ranks take turns: one holds the ring's run token while it computes and hands it on
only when it waits for a peer, so threads do not fight over the GIL at every tensor op.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .buffers import BufferPool
from .pitched import copy_piece
from .transport import TransportKind


class RingAborted(RuntimeError):
    """Another virtual rank failed, or a peer did not answer within the ring's timeout."""


class SimulatedRing:
    POLL_SECONDS = 0.05

    def __init__(self, world_size: int, timeout: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size: expected a positive rank count, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self._queues: dict[tuple[int, int, int], queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._aborted = threading.Event()
        self._run_token = threading.Lock()
        self.collectives: collections.Counter[int] = collections.Counter()
        """Collectives each rank took part in: all-gathers, shifts, transport set-up."""
        self._groups: dict[int, SimulatedGroup] = {}

    def group(self, rank: int) -> SimulatedGroup:
        """Rank `rank`'s group: the same one for every run, as a process group keeps its transport
        and the transport its buffers from one call to the next."""
        with self._lock:
            if rank not in self._groups:
                self._groups[rank] = SimulatedGroup(self, rank)
            return self._groups[rank]

    def run(self, fn: Callable[[SimulatedGroup], Any]) -> list[Any]:
        """Run `fn(group)` on every virtual rank at once; results in rank order.

        The first failure of any rank is raised here once every rank has stopped.
        """
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def body(rank: int) -> None:
            # Backward runs on each rank's own thread: on GPU, autograd's shared device thread
            # would otherwise run every rank's backward one after another and deadlock the ring.
            with self._run_token, torch.autograd.set_multithreading_enabled(False):
                try:
                    results[rank] = fn(self.group(rank))
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller below
                    errors[rank] = error
                    self.abort()

        threads = [threading.Thread(target=body, args=(rank,), name=f"sim-rank-{rank}") for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failures = [e for e in errors if e is not None]
        root_causes = [e for e in failures if not isinstance(e, RingAborted)]
        if failures:
            raise (root_causes or failures)[0]
        return results

    def abort(self) -> None:
        self._aborted.set()

    def _queue(self, src: int, dst: int, channel: int) -> queue.SimpleQueue:
        with self._lock:
            return self._queues.setdefault((src, dst, channel), queue.SimpleQueue())

    def _until(self, ready: Callable[[], Any], what: str) -> Any:
        """Poll `ready` until it returns something, letting the other ranks run meanwhile."""
        self._run_token.release()
        try:
            deadline = time.monotonic() + self.timeout
            while not self._aborted.is_set():
                result = ready()
                if result is not None:
                    return result
                if time.monotonic() > deadline:
                    self.abort()
                    raise RingAborted(f"simulated ring: no peer answered within {self.timeout}s while {what}")
            raise RingAborted(f"simulated ring aborted by another rank while {what}")
        finally:
            self._run_token.acquire()

    def post(self, src: int, dst: int, channel: int, message: Any) -> None:
        self._queue(src, dst, channel).put(message.clone() if isinstance(message, torch.Tensor) else message)

    def take(self, src: int, dst: int, channel: int) -> torch.Tensor:
        inbox = self._queue(src, dst, channel)

        def next_message():
            try:
                return inbox.get(timeout=self.POLL_SECONDS)
            except queue.Empty:
                return None

        return self._until(next_message, f"rank {dst} waited for rank {src}")


class SimulatedGroup:
    """One virtual rank's handle on a `SimulatedRing`, or on a subgroup of its ranks (`members`,
    in group-rank order; messages kept apart by `namespace`); pass it as `group=` (a RingGroup)."""

    def __init__(self, ring: SimulatedRing, rank: int, members: tuple[int, ...] | None = None, namespace: str = ""):
        self.ring = ring
        self.members = tuple(range(ring.world_size)) if members is None else tuple(members)
        self.global_rank = rank
        self.rank = self.members.index(rank)
        self.world_size = len(self.members)
        self.namespace = namespace
        self._transport: SimulatedTransport | None = None  # made at first use, kept with its buffers

    def post(self, dst: int, channel: object, message: Any) -> None:
        self.ring.post(self.global_rank, self.members[dst], (self.namespace, channel), message)

    def take(self, src: int, channel: object) -> Any:
        return self.ring.take(self.members[src], self.global_rank, (self.namespace, channel))

    def _exchange(self, channel: str, outgoing: list[Any]) -> list[Any]:
        """outgoing[dst] to every group rank; what each sent here, in rank order (a collective)."""
        self.ring.collectives[self.global_rank] += 1
        for dst, message in enumerate(outgoing):
            self.post(dst, channel, message)
        return [self.take(src, channel) for src in range(self.world_size)]

    def all_gather(self, tensor: torch.Tensor, what: str = "") -> list[torch.Tensor]:
        return self._exchange("gather", [tensor] * self.world_size)

    def all_gather_object(self, value: Any) -> list[Any]:
        return self._exchange("gather", [value] * self.world_size)

    def all_to_all(self, send: torch.Tensor, what: str = "") -> torch.Tensor:
        return torch.stack(self._exchange("all_to_all", list(send.unbind(0))))

    def transport(self, kind: TransportKind, device: torch.device) -> SimulatedTransport:
        if self._transport is None:
            self._exchange("gather", ["transport set-up"] * self.world_size)
            self._transport = SimulatedTransport(self)
        return self._transport

    def timeout(self) -> float:
        return self.ring.timeout

    def check_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # in-process: the host has every rank's values


class _SimulatedShift:
    """Matches its peer's send by posting order, as NCCL and gloo do: the n-th receive posted from
    a rank on a channel takes that rank's n-th send, whatever order the receives are waited in. A
    shift's pieces travel as one message."""

    def __init__(self, transport: SimulatedTransport, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], offset: int, channel: int):
        group = transport.group
        self.transport, self.recvs, self.channel = transport, list(recvs), channel
        self.src = (group.rank - offset) % group.world_size
        group.ring.collectives[group.global_rank] += 1
        if any(send.numel() for send in sends):
            dst = (group.rank + offset) % group.world_size
            group.post(dst, channel, (transport.count(transport.sent, dst, channel), [send.clone(memory_format=torch.contiguous_format) for send in sends]))
        self.receives = any(recv.numel() for recv in self.recvs)
        if self.receives:
            self.number = transport.count(transport.posted, self.src, channel)

    def wait(self) -> None:
        if self.receives:
            for recv, piece in zip(self.recvs, self.transport.take(self.src, self.channel, self.number), strict=True):
                if recv.numel():
                    copy_piece(recv, piece)


class SimulatedTransport:
    stream_ordered = False
    copies_into_peers = True  # stands for the copy engine: the all-to-all runs as shifts
    watchdog = None

    def __init__(self, group: SimulatedGroup):
        self.group = group
        self.rank = group.rank
        self.world_size = group.world_size
        self._pool = BufferPool()
        self.sent: collections.Counter = collections.Counter()  # (peer, channel) -> sends posted
        self.posted: collections.Counter = collections.Counter()  # (peer, channel) -> receives posted
        self._early: dict[tuple[int, int, int], list[torch.Tensor]] = {}  # (peer, channel, number) -> taken before its turn

    @staticmethod
    def count(counter: collections.Counter, peer: int, channel: int) -> int:
        counter[(peer, channel)] += 1
        return counter[(peer, channel)]

    def take(self, src: int, channel: int, number: int) -> list[torch.Tensor]:
        """src's `number`-th send on `channel` (its pieces), keeping any earlier-posted ones for their receives."""
        while (src, channel, number) not in self._early:
            sent_number, tensor = self.group.take(src, channel)
            self._early[(src, channel, sent_number)] = tensor
        return self._early.pop((src, channel, number))

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return self._pool.slots(channel, count, shape, dtype, device)

    def shift(
        self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], offset: int, channel: int = 0,
        lands_at: Sequence[torch.Tensor | None] | None = None,
    ) -> _SimulatedShift:
        return _SimulatedShift(self, sends, recvs, offset, channel)


class SimulatedMesh:
    """u x r virtual ranks as a 2-D Ulysses x ring mesh (W = u * r threads of one process). Rank
    j * u + i is ring rank j and ulysses rank i; `run(fn)` calls `fn(mesh_group)` on every rank,
    with a `UlyssesRing` to pass as `group=`."""

    def __init__(self, ulysses: int, ring: int, timeout: float = 120.0):
        if ulysses < 1 or ring < 1:
            raise ValueError(f"ulysses, ring: expected positive rank counts, got {ulysses} x {ring}")
        self.ulysses, self.ring = ulysses, ring
        self.ranks = SimulatedRing(ulysses * ring, timeout)
        self._groups: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def collectives(self) -> collections.Counter[int]:
        return self.ranks.collectives

    def group(self, rank: int):
        """Rank `rank`'s mesh group, the same one for every run (as SimulatedRing.group)."""
        from .mesh import UlyssesRing

        with self._lock:
            if rank not in self._groups:
                ring_rank, ulysses_rank = divmod(rank, self.ulysses)
                within = tuple(ring_rank * self.ulysses + i for i in range(self.ulysses))
                across = tuple(j * self.ulysses + ulysses_rank for j in range(self.ring))
                self._groups[rank] = UlyssesRing(
                    SimulatedGroup(self.ranks, rank, within, "ulysses"), SimulatedGroup(self.ranks, rank, across, "ring"),
                )
            return self._groups[rank]

    def run(self, fn: Callable[[Any], Any]) -> list[Any]:
        return self.ranks.run(lambda group: fn(self.group(group.global_rank)))

