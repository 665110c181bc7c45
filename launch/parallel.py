"""The device mesh (dp_shard, cp), FSDP2 over all of it with bf16 compute and fp32 master
weights, activation checkpointing per layer or around ring attention, and the cp dim's Ulysses x
ring splits (fa4_cp.integrations.splits): --ulysses's one, or with "auto" every one the heads
allow, each batch running on the one fa4_cp.plan_mesh predicts fastest for its documents."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from config import TrainConfig, ulysses_of
from fa4_cp.integrations.splits import ContextSplits
from model import Decoder


def build_mesh(config: TrainConfig) -> DeviceMesh:
    """(dp_shard, cp): FSDP shards over all of it; attention runs on the cp dim's splits."""
    return init_device_mesh(config.device, (config.dp_shard, config.cp), mesh_dim_names=("dp_shard", "cp"))


def context_splits(config: TrainConfig, mesh: DeviceMesh) -> ContextSplits:
    """The cp dim's Ulysses x ring splits: --ulysses's one, or with "auto" every one the heads allow."""
    model = config.model
    return ContextSplits(
        mesh["cp"], heads=model.n_heads, kv_heads=model.n_kv_heads, head_dim=round(model.attention_head_dim), ulysses=ulysses_of(config),
    )


def shard_model(model: Decoder, mesh: DeviceMesh, config: TrainConfig) -> Decoder:
    """Checkpoint each layer as config.activation_checkpointing asks, then wrap each layer and the
    root in fully_shard over dp_shard x cp. FSDP averages gradients over those ranks (the
    trainer scales its loss to match)."""
    fsdp_mesh = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, config.compute_dtype), reduce_dtype=torch.float32)
    for index, layer in enumerate(model.layers):
        layer.recompute_around_attention = config.activation_checkpointing == "except-attention"
        if config.activation_checkpointing == "layer":
            layer = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            model.layers[index] = layer
        fully_shard(layer, mesh=fsdp_mesh, mp_policy=policy)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)
    return model
