"""accelerate plugin: fa4_cp ring attention on the "cp" dim of accelerate's device mesh.

    accelerator = Accelerator(parallelism_config=ParallelismConfig(cp_size=4, dp_shard_size=2))
    ring = RingAttentionPlugin(accelerator)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ring.attn_implementation)
    model, optimizer = accelerator.prepare(model, optimizer)
    for batch in ring.shard_batches(dataloader):     # zigzag shards, packed documents included
        accelerator.backward(model(**batch).loss)

accelerate's own context parallelism (`maybe_context_parallel`) drives only SDPA; do not enter it
with this plugin. Each rank's loss is its share of its sequence's mean scaled by cp_size, so the
mean over ranks that accelerate reports is the true loss and the gradients that FSDP/DDP average
over all ranks are the unsharded gradients. accelerate refuses ParallelismConfig on CPU processes;
there `cp_size=` builds the (dp, cp) mesh over the accelerator's processes instead.

`ulysses=u` splits the cp dim into a 2-D Ulysses x ring mesh (u ulysses ranks, innermost, inside
a ring of cp_size / u). accelerate's own `sp_size` is DeepSpeed's Ulysses, which accelerate
forbids beside cp_size > 1, so it does not map here: a ParallelismConfig with sp_size > 1 is
refused; use cp_size with `ulysses=` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .batches import shard_batch
from .transformers import register_ring_attention


def _has_cp_dim(accelerator) -> bool:
    mesh = getattr(accelerator, "torch_device_mesh", None)
    return mesh is not None and "cp" in (mesh.mesh_dim_names or ())


class RingAttentionPlugin:
    def __init__(
        self, accelerator, *, cp_size: int | None = None, ulysses: int = 1, backend: str | None = None, transport: str | None = None,
        deterministic: bool = False,
    ):
        self.accelerator = accelerator
        sp_size = getattr(getattr(accelerator, "parallelism_config", None), "sp_size", 1) or 1
        if sp_size > 1:
            raise ValueError(f"sp_size: {sp_size} is DeepSpeed's Ulysses; with this plugin set cp_size and ulysses= instead")
        self.owns_mesh = not _has_cp_dim(accelerator)  # True: accelerate does not know the cp groups
        self.cp_mesh = self._cp_mesh(accelerator, cp_size)
        self.cp_size = self.cp_mesh.size()
        self.ring_group = self.cp_mesh if ulysses == 1 else self._split(accelerator, ulysses)
        self.attn_implementation = register_ring_attention(self.ring_group, backend=backend, transport=transport, deterministic=deterministic)

    @staticmethod
    def _cp_mesh(accelerator, cp_size: int | None) -> DeviceMesh:
        if _has_cp_dim(accelerator):
            mesh = accelerator.torch_device_mesh
            if cp_size is not None and cp_size != mesh["cp"].size():
                raise ValueError(f"cp_size: {cp_size} differs from the ParallelismConfig's cp_size {mesh['cp'].size()}")
            return mesh["cp"]
        if cp_size is None:
            raise ValueError("cp_size: the Accelerator has no 'cp' mesh dim; pass ParallelismConfig(cp_size=N) or cp_size=N")
        processes = accelerator.num_processes
        if cp_size < 1 or processes % cp_size:
            raise ValueError(f"cp_size: {cp_size} must divide the number of processes ({processes})")
        return init_device_mesh(accelerator.device.type, (processes // cp_size, cp_size), mesh_dim_names=("dp", "cp"))["cp"]

    def _split(self, accelerator, ulysses: int) -> DeviceMesh:
        """The cp dim as a (ring, ulysses) mesh over the same ranks (collective: every rank makes it)."""
        if ulysses < 1 or self.cp_size % ulysses:
            raise ValueError(f"ulysses: {ulysses} must divide cp_size {self.cp_size}")
        root = self.cp_mesh._get_root_mesh() if hasattr(self.cp_mesh, "_get_root_mesh") else accelerator.torch_device_mesh
        names = list(root.mesh_dim_names)
        cp = names.index("cp")
        shape = list(root.mesh.shape)
        ranks = root.mesh.reshape(*shape[:cp], self.cp_size // ulysses, ulysses, *shape[cp + 1 :])
        names[cp : cp + 1] = ["ring", "ulysses"]
        return DeviceMesh(root.device_type, ranks, mesh_dim_names=tuple(names))["ring", "ulysses"]

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's model inputs from a full batch (every cp rank passes the same batch)."""
        local = shard_batch({key: value.cpu() if torch.is_tensor(value) else value for key, value in batch.items()}, group=self.ring_group)
        local["num_items_in_batch"] = local["num_items_in_batch"] / self.cp_size
        device = self.accelerator.device
        return {key: value.to(device) if torch.is_tensor(value) and not key.startswith("cu_seq_lens") else value for key, value in local.items()}

    def shard_batches(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            yield self.shard(batch)
