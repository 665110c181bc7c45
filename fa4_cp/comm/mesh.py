"""The 2-D group of Ulysses x ring context parallelism: u ranks that trade heads for sequence by
all-to-all, inside a ring of r ranks that runs the ring loop.

`resolve_mesh` accepts a 2-D DeviceMesh with dims named "ulysses" and "ring", or a `UlyssesRing`
(a simulated mesh's group is one). Ranks are numbered ring-major, ring rank j and ulysses rank i
being rank j * u + i: a ring rank's rows are split over its ulysses ranks in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .group import RingGroup, resolve_group

MESH_DIMS = ("ulysses", "ring")


@dataclass(frozen=True, eq=False)
class UlyssesRing:
    ulysses: RingGroup
    ring: RingGroup

    @property
    def rank(self) -> int:
        return self.ring.rank * self.ulysses.world_size + self.ulysses.rank

    @property
    def world_size(self) -> int:
        return self.ring.world_size * self.ulysses.world_size

    def all_gather(self, tensor: torch.Tensor, what: str = "an all-gather of the 2-D mesh") -> list[torch.Tensor]:
        """Every rank's `tensor`, in rank order (within each ulysses group, then across the ring)."""
        within = torch.stack(self.ulysses.all_gather(tensor, what))
        return [piece for block in self.ring.all_gather(within, what) for piece in block.unbind(0)]


def resolve_mesh(group: object) -> UlyssesRing | None:
    """The 2-D group of `group=`, or None for a 1-D one. No communication."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, UlyssesRing):
        return group
    if isinstance(group, DeviceMesh) and group.ndim == 2:
        names = group.mesh_dim_names
        if names is None or sorted(names) != sorted(MESH_DIMS):
            raise ValueError(f"group: a 2-D DeviceMesh needs dims named 'ulysses' and 'ring', got {names}")
        return UlyssesRing(resolve_group(group["ulysses"]), resolve_group(group["ring"]))
    return None


def world_size_of(group: object) -> int:
    """Ranks of `group=`, a ring or a 2-D mesh."""
    mesh = resolve_mesh(group)
    return resolve_group(group).world_size if mesh is None else mesh.world_size

