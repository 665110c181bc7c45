"""Transports: how a buffer moves between the ranks of a ring.

`shift(sends, recvs, offset)` sends the pieces `sends` to rank (r + offset) mod W and receives into
`recvs` from rank (r - offset) mod W, all posted together as one transfer (one handshake, one
collective launch: a hop's K and V rows, an all-to-all's parts for one peer), so every rank can
call it at once for any W. Sizes may differ between ranks (a piece matches its peer's piece); an
empty piece is skipped, by both ends alike. Shifts between two ranks on a channel match in the
order they are posted. Every rank's buffers have one layout; a piece lands where its recv is on
this rank, or, given `lands_at` (views of this rank's buffers), where its view is, for a piece
whose place depends on the receiver's plan, not the sender's. A transport that copies into its
peers also takes a send of pitched rows (comm/pitched.py: a head group of q, say) as it lies; it
lands as its contiguous bytes, in a recv of bytes.
Receive buffers come from the transport's `buffers`, kept across calls. A stream-ordered (GPU)
transport enqueues on the current CUDA stream and its `wait` makes the current stream wait;
the others block the host, at most the ring timeout. A transport knows nothing of attention:
it only moves tensors. transports.py makes them, for their group (group.py), once per group and
device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from .buffers import BufferPool
from .pitched import copy_piece
from .watchdog import HopWatchdog, wait_within

TransportKind = Literal["auto", "nccl", "copy_engine"]
TRANSPORTS: tuple[TransportKind, ...] = ("auto", "nccl", "copy_engine")


class PendingShift(Protocol):
    def wait(self) -> None:
        """Until `recv` holds the data and `send` may be reused: the host blocks, or on a
        stream-ordered transport the current stream waits."""


class Transport(Protocol):
    rank: int
    world_size: int
    stream_ordered: bool
    copies_into_peers: bool
    """Whether a shift copies into the peer's buffer itself (no collective library): an
    all-to-all then runs best as shifts (comm/all_to_all.py)."""
    watchdog: HopWatchdog | None

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """`count` receive-capable buffers for `channel`, reused across calls. Every rank must ask
        for the same shapes in the same order."""
        ...

    def shift(
        self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], offset: int, channel: int = 0,
        lands_at: Sequence[torch.Tensor | None] | None = None,
    ) -> PendingShift:
        """Start moving the pieces `sends` `offset` ranks forward, into the peer's `recvs`, as one
        transfer. Shifts on one channel complete in order."""
        ...


class Done:
    """A shift that completed when it was posted."""

    def wait(self) -> None:
        pass


class LocalTransport:
    """The ring of one rank: nothing moves."""

    rank = 0
    world_size = 1
    stream_ordered = False
    copies_into_peers = False
    watchdog = None

    def __init__(self):
        self._pool = BufferPool()

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return self._pool.slots(channel, count, shape, dtype, device)

    def shift(
        self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], offset: int, channel: int = 0,
        lands_at: Sequence[torch.Tensor | None] | None = None,
    ) -> PendingShift:
        return copied_to_self(sends, recvs)


def copied_to_self(sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor]) -> Done:
    """A shift by a multiple of W: each piece copied into its recv here."""
    for send, recv in zip(sends, recvs, strict=True):
        copy_piece(recv, send)
    return Done()


class _StreamOrderedRequests:
    """NCCL requests: `wait` makes the current stream wait; the hop watchdog bounds the time."""

    def __init__(self, requests: list):
        self.requests = requests

    def wait(self) -> None:
        for request in self.requests:
            request.wait()


class _HostRequests:
    """gloo requests: `wait` blocks the host, at most the ring timeout."""

    def __init__(self, requests: list, timeout: float, rank: int, world_size: int, offset: int):
        self.requests, self.timeout, self.rank, self.world_size, self.offset = requests, timeout, rank, world_size, offset

    def wait(self) -> None:
        for request in self.requests:
            wait_within(request, self.timeout, self.rank, self.world_size, f"a shift of {self.offset} rank(s)")


class ProcessGroupTransport:
    """torch.distributed point-to-point: gloo on CPU; NCCL on GPU, a shift's sends grouped with its
    receives (one batch_isend_irecv), stream-ordered behind the comm stream."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout
        self.stream_ordered = device.type == "cuda"
        self.copies_into_peers = False
        self.watchdog = HopWatchdog(self.rank, self.world_size, timeout) if self.stream_ordered else None
        self._pool = BufferPool()

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return self._pool.slots(channel, count, shape, dtype, device)

    def shift(
        self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], offset: int, channel: int = 0,
        lands_at: Sequence[torch.Tensor | None] | None = None,
    ) -> PendingShift:
        if offset % self.world_size == 0:
            return copied_to_self(sends, recvs)
        dst = dist.get_global_rank(self.group, (self.rank + offset) % self.world_size)
        src = dist.get_global_rank(self.group, (self.rank - offset) % self.world_size)
        ops = [
            dist.P2POp(operation, tensor, peer, self.group, tag=channel)
            for send, recv in zip(sends, recvs, strict=True)
            for operation, tensor, peer in ((dist.isend, send, dst), (dist.irecv, recv, src))
            if tensor.numel()
        ]
        if not ops:
            return Done()
        requests = dist.batch_isend_irecv(ops)
        if self.stream_ordered:
            return _StreamOrderedRequests(requests)
        return _HostRequests(requests, self.timeout, self.rank, self.world_size, offset)


def ring_buffer_bytes(transport: Transport) -> int:
    """Bytes held by `transport`'s persistent KV/dKV buffers."""
    return transport._pool.nbytes()
