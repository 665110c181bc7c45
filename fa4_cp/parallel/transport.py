"""Transports: how a buffer moves between the ranks of a ring.

`shift(send, recv, offset)` sends `send` to rank (r + offset) mod W and receives into `recv` from
rank (r - offset) mod W, both posted together, so every rank can call it at once for any W.
A transport knows nothing of attention: it only moves tensors.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class PendingShift(Protocol):
    def wait(self) -> None:
        """Block until `recv` holds the data and `send` may be reused."""


class Transport(Protocol):
    rank: int
    world_size: int

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
    """torch.distributed point-to-point: gloo on CPU, NCCL on GPU."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

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


def resolve_transport(group: object) -> Transport:
    """The transport for `group`: None (the default group, or one rank without torch.distributed),
    a ProcessGroup, a 1-D DeviceMesh, or a simulated ring's group."""
    from torch.distributed.device_mesh import DeviceMesh

    from .simulated import SimulatedGroup, SimulatedTransport

    if isinstance(group, SimulatedGroup):
        return SimulatedTransport(group)
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group: expected a 1-D DeviceMesh (the context-parallel dim, e.g. mesh['cp']), got {group.ndim}-D")
        group = group.get_group()
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return LocalTransport()
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: expected None, a ProcessGroup, a 1-D DeviceMesh or a SimulatedGroup, got {type(group).__name__}")
    return ProcessGroupTransport(group)
