"""Transports: how a buffer moves between the ranks of a ring.

`shift(send, recv, offset)` sends `send` to rank (r + offset) mod W and receives into `recv` from
rank (r - offset) mod W, both posted together, so every rank can call it at once for any W.
Receive buffers come from the transport's `buffers`, kept across calls. A stream-ordered (GPU)
transport enqueues on the current CUDA stream and its `wait` makes the current stream wait;
the others block the host. A transport knows nothing of attention: it only moves tensors.

Transports per group are made once and cached, so their buffers outlive a call. On a group of
GPUs of one node with peer access, "auto" picks the copy-engine transport, otherwise NCCL
point-to-point; FA4_CP_TRANSPORT or the `transport` argument overrides it.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.distributed as dist

from .buffers import BufferPool
from .watchdog import HopWatchdog, ring_timeout


class PendingShift(Protocol):
    def wait(self) -> None:
        """Until `recv` holds the data and `send` may be reused: the host blocks, or on a
        stream-ordered transport the current stream waits."""


class Transport(Protocol):
    rank: int
    world_size: int
    stream_ordered: bool
    watchdog: HopWatchdog | None

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """`count` receive-capable buffers for `channel`, reused across calls. Every rank must ask
        for the same shapes in the same order."""
        ...

    def shift(self, send: torch.Tensor, recv: torch.Tensor, offset: int, channel: int = 0) -> PendingShift:
        """Start moving `send` `offset` ranks forward. Shifts on one channel complete in order."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all), in rank order."""
        ...


class _Done:
    def wait(self) -> None:
        pass


class LocalTransport:
    """The ring of one rank: nothing moves."""

    rank = 0
    world_size = 1
    stream_ordered = False
    watchdog = None

    def __init__(self):
        self._pool = BufferPool()

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return self._pool.slots(channel, count, shape, dtype, device)

    def shift(self, send: torch.Tensor, recv: torch.Tensor, offset: int, channel: int = 0) -> PendingShift:
        recv.copy_(send)
        return _Done()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


class _Requests:
    def __init__(self, requests: list):
        self.requests = requests

    def wait(self) -> None:
        for request in self.requests:
            request.wait()


class ProcessGroupTransport:
    """torch.distributed point-to-point: gloo on CPU; NCCL on GPU, each send grouped with its
    receive (one batch_isend_irecv), stream-ordered behind the comm stream."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stream_ordered = device.type == "cuda"
        self.watchdog = HopWatchdog(self.rank, self.world_size, ring_timeout(group)) if self.stream_ordered else None
        self._pool = BufferPool()

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return self._pool.slots(channel, count, shape, dtype, device)

    def shift(self, send: torch.Tensor, recv: torch.Tensor, offset: int, channel: int = 0) -> PendingShift:
        if offset % self.world_size == 0:
            recv.copy_(send)
            return _Done()
        dst = dist.get_global_rank(self.group, (self.rank + offset) % self.world_size)
        src = dist.get_global_rank(self.group, (self.rank - offset) % self.world_size)
        ops = [
            dist.P2POp(dist.isend, send, dst, self.group, tag=channel),
            dist.P2POp(dist.irecv, recv, src, self.group, tag=channel),
        ]
        return _Requests(dist.batch_isend_irecv(ops))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        everyone = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(everyone, tensor.contiguous(), group=self.group)
        return everyone


TRANSPORTS = ("auto", "nccl", "copy_engine")
_cache: dict[tuple, tuple[dist.ProcessGroup | None, object]] = {}


def resolve_transport(group: object, kind: str | None = None, device: torch.device | None = None) -> Transport:
    """The transport for `group` on `device`: None (the default group, or one rank without
    torch.distributed), a ProcessGroup, a 1-D DeviceMesh, or a simulated ring's group. `kind` is
    one of TRANSPORTS (None: FA4_CP_TRANSPORT, else "auto"); it only matters on GPUs."""
    from torch.distributed.device_mesh import DeviceMesh

    from .simulated import SimulatedGroup, SimulatedTransport

    kind = kind or os.environ.get("FA4_CP_TRANSPORT", "auto")
    if kind not in TRANSPORTS:
        raise ValueError(f"transport: expected one of {TRANSPORTS}, got {kind!r}")
    if isinstance(group, SimulatedGroup):
        if group.transport is None:
            group.transport = SimulatedTransport(group)
        return group.transport
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group: expected a 1-D DeviceMesh (the context-parallel dim, e.g. mesh['cp']), got {group.ndim}-D")
        group = group.get_group()
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return _cached(("local",), None, LocalTransport)
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: expected None, a ProcessGroup, a 1-D DeviceMesh or a SimulatedGroup, got {type(group).__name__}")
    device = device or torch.device("cpu")
    if device.type != "cuda" or dist.get_world_size(group) == 1:
        return _cached(("p2p", str(device)), group, lambda: ProcessGroupTransport(group, device))
    if kind == "auto":
        kind = _auto_kind(group, device)
    if kind == "copy_engine":
        from .copy_engine import CopyEngineTransport

        return _cached((kind, str(device)), group, lambda: CopyEngineTransport(group, device))
    return _cached((kind, str(device)), group, lambda: ProcessGroupTransport(group, device))


def release_transports() -> None:
    """Drop every cached transport and its persistent ring buffers, e.g. between benchmark
    contenders. Call it on every rank, with no ring call in flight."""
    _cache.clear()


def ring_buffer_bytes(transport: Transport) -> int:
    """Bytes held by `transport`'s persistent KV/dKV buffers."""
    return transport._pool.nbytes()


def _auto_kind(group: dist.ProcessGroup, device: torch.device) -> str:
    from .copy_engine import node_has_peer_access

    return _cached(("auto", str(device)), group, lambda: "copy_engine" if node_has_peer_access(group, device) else "nccl")


def _cached(key: tuple, group: dist.ProcessGroup | None, make):
    """One value per (group, key); a new group under an old name (after destroy) gets a new one."""
    full_key = (group.group_name if group is not None else None, *key)
    entry = _cache.get(full_key)
    if entry is None or entry[0] is not group:
        entry = _cache[full_key] = (group, make())
    return entry[1]
