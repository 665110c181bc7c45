"""The device mesh (dp_shard, cp), or (dp_shard, ring, ulysses) with --ulysses, FSDP2 over all of
it with bf16 compute and fp32 master weights, and activation checkpointing per layer or around
ring attention."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from config import TrainConfig
from model import Decoder


def build_mesh(config: TrainConfig) -> DeviceMesh:
    if config.ulysses == 1:
        return init_device_mesh(config.device, (config.dp_shard, config.cp), mesh_dim_names=("dp_shard", "cp"))
    shape = (config.dp_shard, config.cp // config.ulysses, config.ulysses)  # ulysses innermost: the nearest ranks
    return init_device_mesh(config.device, shape, mesh_dim_names=("dp_shard", "ring", "ulysses"))


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
