"""The device mesh (dp_shard, cp), or (dp_shard, ring, ulysses) with --ulysses, FSDP2 over all of
it with bf16 compute and fp32 master weights, and activation checkpointing per layer or around
ring attention. With --ulysses auto, every split of the cp ranks that the heads allow is built at
start (ContextSplits), and each batch runs on the one fa4_cp.plan_mesh predicts fastest for its
documents."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fa4_cp
from config import TrainConfig, ulysses_of
from fa4_cp.validation import heads_split
from model import Decoder


def build_mesh(config: TrainConfig, ulysses: int | None = None) -> DeviceMesh:
    """The mesh of `ulysses` (default: --ulysses; "auto" builds the plain (dp_shard, cp) mesh,
    which FSDP uses whatever the batch's split)."""
    ulysses = ulysses_of(config) if ulysses is None else ulysses
    if ulysses in (1, "auto"):
        return init_device_mesh(config.device, (config.dp_shard, config.cp), mesh_dim_names=("dp_shard", "cp"))
    shape = (config.dp_shard, config.cp // ulysses, ulysses)  # ulysses innermost: the nearest ranks
    return init_device_mesh(config.device, shape, mesh_dim_names=("dp_shard", "ring", "ulysses"))


class ContextSplits:
    """The context-parallel group of each Ulysses x ring split of the cp ranks: one fixed split, or
    with --ulysses auto every one the heads allow, chosen per batch by fa4_cp.plan_mesh. The
    ranks of a cp group see the same batch, so they choose the same split without a word."""

    def __init__(self, config: TrainConfig, mesh: DeviceMesh):
        self.config, self.auto = config, ulysses_of(config) == "auto"
        self.groups = {ulysses_of(config) if not self.auto else 1: context_parallel_group(mesh)}
        if self.auto:
            model = config.model
            for ulysses in range(2, config.cp + 1):
                if config.cp % ulysses == 0 and heads_split(model.n_heads, model.n_kv_heads, ulysses):
                    self.groups[ulysses] = context_parallel_group(build_mesh(config, ulysses))

    def choose(self, cu_seqlens: torch.Tensor | None) -> int:
        """The split for a batch: the fixed one, or the predicted fastest for its documents."""
        if not self.auto or len(self.groups) == 1:
            return next(iter(self.groups))
        model = self.config.model
        documents = None if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        plan = fa4_cp.plan_mesh(
            self.config.cp, model.n_heads, model.n_kv_heads, self.config.seq_len, head_dim=model.head_dim, documents=documents,
        )
        return plan.ulysses


def context_parallel_dims(mesh: DeviceMesh) -> tuple[str, ...]:
    return ("cp",) if "cp" in mesh.mesh_dim_names else ("ring", "ulysses")


def context_parallel_group(mesh: DeviceMesh) -> DeviceMesh:
    """What ring attention and sharding take: the cp dim, or the 2-D (ring, ulysses) mesh."""
    return mesh[context_parallel_dims(mesh)]


def shard_model(model: Decoder, mesh: DeviceMesh, config: TrainConfig) -> Decoder:
    """Checkpoint each layer as config.activation_checkpointing asks, then wrap each layer and the
    root in fully_shard over dp_shard x cp. FSDP averages gradients over those ranks (the
    trainer scales its loss to match)."""
    fsdp_mesh = mesh["dp_shard", *context_parallel_dims(mesh)]._flatten("dp_shard_cp")
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, config.compute_dtype), reduce_dtype=torch.float32)
    for index, layer in enumerate(model.layers):
        layer.recompute_around_attention = config.activation_checkpointing == "except-attention"
        if config.activation_checkpointing == "layer":
            layer = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            model.layers[index] = layer
        fully_shard(layer, mesh=fsdp_mesh, mp_policy=policy)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)
    return model
