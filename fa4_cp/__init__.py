"""fa4-cp: ring (context-parallel) attention with FlashAttention-4 kernels and LSE partials."""

from .attention import ring_attention, ring_attention_varlen
from .consistency import set_consistency_check
from .comm.simulated import SimulatedMesh, SimulatedRing
from .context_parallel import context_parallel, context_parallel_unshard
from .tuning.mesh_model import plan_mesh
from .plan.sharding import Sharding
from .shard import shard, shard_inputs, shift_labels, unshard

__all__ = [
    "ring_attention",
    "ring_attention_varlen",
    "context_parallel",
    "context_parallel_unshard",
    "shard",
    "unshard",
    "shard_inputs",
    "shift_labels",
    "Sharding",
    "SimulatedRing",
    "SimulatedMesh",
    "plan_mesh",
    "set_consistency_check",
]
