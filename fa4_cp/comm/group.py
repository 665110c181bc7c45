"""The ring's group: rank, world size and all-gather, from whatever the caller passes as `group=`.

`resolve_group` accepts None (the default process group, or a ring of one without
torch.distributed), a ProcessGroup, a 1-D DeviceMesh, or an object that already is a `RingGroup`
(a simulated ring's group is one). It never communicates, so `shard` and `unshard`, which need no
transport, and the argument checks of a ring call all run before any collective.

`RingGroup.transport(kind, device)` gives the transport of the ring loop (transports.py makes
it): made once per group and device and cached, because its buffers outlive a call. Making it may
be collective (the copy engine's symmetric memory, the peer-access check of "auto").
"""

from __future__ import annotations

import atexit
import functools
import os
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .transport import LocalTransport, Transport, TransportKind
from .transports import make_transport, resolve_kind
from .watchdog import wait_within


@runtime_checkable
class RingGroup(Protocol):
    rank: int
    world_size: int

    def all_gather(self, tensor: torch.Tensor, what: str = "an all-gather of the ring group") -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all), in rank order. On a GPU the result is
        stream-ordered; elsewhere a peer that does not join within `timeout()` raises, naming `what`."""
        ...

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's picklable `value`, in rank order."""
        ...

    def all_to_all(self, send: torch.Tensor, what: str = "an all-to-all of the ring group") -> torch.Tensor:
        """`send[j]` (send: one row per rank) to rank j; row j of the result is what rank j sent
        here. Stream-ordered on a GPU, as `all_gather`."""
        ...

    def transport(self, kind: TransportKind, device: torch.device) -> Transport:
        """The ring loop's transport for `device` (cached; making it may be collective)."""
        ...

    def timeout(self) -> float:
        """Seconds a rank waits for its peers before it fails (FA4_CP_RING_TIMEOUT)."""
        ...

    def check_device(self, device: torch.device) -> torch.device:
        """Where the cross-rank check of a call on `device` all-gathers: the CPU wherever the
        group can, so that the check never waits for the GPU."""
        ...


class LocalGroup:
    """A ring of one rank, without torch.distributed."""

    rank = 0
    world_size = 1

    def __init__(self):
        self._transport = LocalTransport()

    def all_gather(self, tensor: torch.Tensor, what: str = "") -> list[torch.Tensor]:
        return [tensor]

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value]

    def all_to_all(self, send: torch.Tensor, what: str = "") -> torch.Tensor:
        return send

    def transport(self, kind: TransportKind, device: torch.device) -> Transport:
        return self._transport

    def timeout(self) -> float:
        return ring_timeout(None)

    def check_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")


class ProcessGroupRing:
    """A torch.distributed process group as a ring."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._transports: dict[tuple[str, str], Transport] = {}
        self._auto: dict[str, TransportKind] = {}

    def all_gather(self, tensor: torch.Tensor, what: str = "an all-gather of the ring group") -> list[torch.Tensor]:
        everyone = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._finish(dist.all_gather(everyone, tensor.contiguous(), group=self.group, async_op=True), tensor.device, what)
        return everyone

    def all_gather_object(self, value: Any) -> list[Any]:
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, value, group=self.group)
        return everyone

    def all_to_all(self, send: torch.Tensor, what: str = "an all-to-all of the ring group") -> torch.Tensor:
        send = send.contiguous()
        received = torch.empty_like(send)
        self._finish(dist.all_to_all_single(received, send, group=self.group, async_op=True), send.device, what)
        return received

    def _finish(self, work, device: torch.device, what: str) -> None:
        if device.type == "cuda":
            work.wait()  # stream-ordered; the caller waits for the host values under the watchdog
        else:
            wait_within(work, self.timeout(), self.rank, self.world_size, what)

    def transport(self, kind: TransportKind, device: torch.device) -> Transport:
        kind = resolve_kind(kind, self.group, device, self._auto)
        if (kind, str(device)) not in self._transports:
            self._transports[(kind, str(device))] = make_transport(kind, self.group, device, self.timeout())
        return self._transports[(kind, str(device))]

    def timeout(self) -> float:
        return ring_timeout(self.group)

    def check_device(self, device: torch.device) -> torch.device:
        """The CPU when the group has a CPU backend too (gloo, as after
        init_process_group("cpu:gloo,cuda:nccl")), else `device`."""
        return torch.device("cpu") if self._runs_on_cpu else device

    @functools.cached_property
    def _runs_on_cpu(self) -> bool:
        try:
            self.group._get_backend(torch.device("cpu"))
        except RuntimeError:
            return False
        return True


_groups: dict[str, ProcessGroupRing] = {}
_local: LocalGroup | None = None
# A cached ring keeps its process group, and so gloo's threads, alive past destroy_process_group;
# if they are still running when the interpreter tears down, the process aborts. Release them
# while the interpreter is whole.
atexit.register(_groups.clear)


def _is_registered(group: dist.ProcessGroup) -> bool:
    try:
        dist.get_rank(group)
    except ValueError:  # destroyed with destroy_process_group
        return False
    return True


def resolve_group(group: object = None) -> RingGroup:
    """The RingGroup of `group=`; no communication. A new process group under an old name
    (after destroy_process_group) gets a new RingGroup."""
    global _local
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            _local = _local or LocalGroup()
            return _local
        group = dist.group.WORLD
    elif isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group: expected a 1-D DeviceMesh (the context-parallel dim, e.g. mesh['cp']), got {group.ndim}-D "
                "(ring attention itself also takes a 2-D mesh with dims 'ulysses' and 'ring')"
            )
        group = group.get_group()
    elif not isinstance(group, dist.ProcessGroup):
        if isinstance(group, RingGroup):
            return group
        raise ValueError(f"group: expected None, a ProcessGroup, a 1-D DeviceMesh or a RingGroup, got {type(group).__name__}")
    ring = _groups.get(group.group_name)
    if ring is None or ring.group is not group:
        for name in [name for name, cached in _groups.items() if not _is_registered(cached.group)]:
            del _groups[name]  # their buffers and groups go with them
        ring = _groups[group.group_name] = ProcessGroupRing(group)
    return ring


def release_transports() -> None:
    """Drop every cached transport and its persistent ring buffers, e.g. between benchmark
    contenders. Call it on every rank, with no ring call in flight."""
    global _local
    _groups.clear()
    _local = None


def ring_timeout(group: dist.ProcessGroup | None) -> float:
    """FA4_CP_RING_TIMEOUT if set, else the process group's own timeout, else 600 s."""
    if "FA4_CP_RING_TIMEOUT" in os.environ:
        return float(os.environ["FA4_CP_RING_TIMEOUT"])
    for device in ("cuda", "cpu"):
        try:
            return group._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (AttributeError, RuntimeError):
            continue
    return 600.0
