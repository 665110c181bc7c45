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
a ring of cp_size / u); `ulysses="auto"` with `model_config=` (the model's transformers config,
for its heads) makes every split the heads allow and runs each batch on the one fa4_cp.plan_mesh
predicts fastest for its documents (integrations/splits.py). accelerate's own `sp_size` is
DeepSpeed's Ulysses, which accelerate forbids beside cp_size > 1, so it does not map here: a
ParallelismConfig with sp_size > 1 is refused; use cp_size with `ulysses=` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .batches import documents_from_positions, shard_batch
from .splits import ContextSplits, split_cp_dim
from .transformers import rebind_ring, register_ring_attention


def _has_cp_dim(accelerator) -> bool:
    mesh = getattr(accelerator, "torch_device_mesh", None)
    return mesh is not None and "cp" in (mesh.mesh_dim_names or ())


class RingAttentionPlugin:
    def __init__(
        self, accelerator, *, cp_size: int | None = None, ulysses: int | str = 1, model_config=None, backend: str | None = None,
        transport: str | None = None, deterministic: bool = False,
    ):
        self.accelerator = accelerator
        sp_size = getattr(getattr(accelerator, "parallelism_config", None), "sp_size", 1) or 1
        if sp_size > 1:
            raise ValueError(f"sp_size: {sp_size} is DeepSpeed's Ulysses; with this plugin set cp_size and ulysses= instead")
        self.owns_mesh = not _has_cp_dim(accelerator)  # True: accelerate does not know the cp groups
        self.cp_mesh = self._cp_mesh(accelerator, cp_size)
        self.cp_size = self.cp_mesh.size()
        self.splits = None
        self.head_chunks = 1  # with ulysses="auto", the chosen split's (plan_mesh's)
        if ulysses == "auto":
            self.splits = self._auto_splits(model_config)
            self.ring_group = self.splits.groups[1]
        else:
            self.ring_group = self.cp_mesh if ulysses == 1 else split_cp_dim(self.cp_mesh, ulysses)
        self.attn_implementation = register_ring_attention(self.ring_group, backend=backend, transport=transport, deterministic=deterministic)

    def _auto_splits(self, model_config) -> ContextSplits:
        if model_config is None:
            raise ValueError("model_config: ulysses='auto' needs the model's config (its heads) to choose a split per batch")
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        return ContextSplits(self.cp_mesh, heads=heads, kv_heads=kv_heads, head_dim=head_dim)

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

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's model inputs from a full batch (every cp rank passes the same batch); with
        ulysses="auto", on the split chosen for its documents."""
        batch = {key: value.cpu() if torch.is_tensor(value) else value for key, value in batch.items()}
        if self.splits is not None:
            positions = batch.get("position_ids")
            documents = None if positions is None else documents_from_positions(positions)
            choice = self.splits.choose(documents, batch["input_ids"].shape[-1])
            if choice.group is not self.ring_group or choice.head_chunks != self.head_chunks:
                self.ring_group, self.head_chunks = rebind_ring(self.attn_implementation, choice.group, choice.head_chunks), choice.head_chunks
        local = shard_batch(batch, group=self.ring_group)
        local["num_items_in_batch"] = local["num_items_in_batch"] / self.cp_size
        device = self.accelerator.device
        return {key: value.to(device) if torch.is_tensor(value) and not key.startswith("cu_seq_lens") else value for key, value in local.items()}

    def shard_batches(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            yield self.shard(batch)
