"""Which transport a ring group uses, and making it: the transport kinds' factories and the
"auto" policy (the copy engine where every rank of the group can map every other rank's GPU,
else NCCL). Between CPU ranks, or on a ring of one GPU, the group's own point-to-point serves
whatever the kind."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .copy_engine import CopyEngineTransport, node_has_peer_access
from .transport import ProcessGroupTransport, Transport, TransportKind

POINT_TO_POINT = "point_to_point"  # NCCL between GPUs; the group's own backend (gloo) elsewhere
_FACTORIES: dict[str, Callable[[dist.ProcessGroup, torch.device, float], Transport]] = {
    "copy_engine": CopyEngineTransport,
    "nccl": ProcessGroupTransport,
    POINT_TO_POINT: ProcessGroupTransport,
}


def resolve_kind(kind: TransportKind, group: dist.ProcessGroup, device: torch.device, decided: dict[str, str]) -> str:
    """The concrete kind a call of `kind` gets on `device`; "auto" is decided once per device
    (collective: the peer-access check), remembered in `decided`."""
    if device.type != "cuda" or dist.get_world_size(group) == 1:
        return POINT_TO_POINT
    if kind != "auto":
        return kind
    if str(device) not in decided:
        decided[str(device)] = "copy_engine" if node_has_peer_access(group, device) else "nccl"
    return decided[str(device)]


def make_transport(kind: str, group: dist.ProcessGroup, device: torch.device, timeout: float) -> Transport:
    """A new transport of a concrete kind (`resolve_kind`); may be collective."""
    return _FACTORIES[kind](group, device, timeout)
