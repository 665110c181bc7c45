"""A drop-in for torch's `context_parallel`: the same arguments, fa4_cp's ring underneath.

    from fa4_cp import context_parallel                  # was: torch.distributed.tensor.experimental
    with context_parallel(mesh["cp"], buffers=[tokens, labels, freqs], buffer_seq_dims=[1, 1, 0]):
        loss = model(tokens, labels)                     # every F.scaled_dot_product_attention runs on the ring
        loss.backward()

As torch's does, it shards the buffers in place along their sequence dims (zigzag, which is torch's
head-tail load balancer), restores them on exit (except `no_restore_buffers`), and sends each
`F.scaled_dot_product_attention` call inside it to the ring: causal or not, `scale`, GQA through
`enable_gqa` (KV is never repeated). What SDPA takes and the ring cannot (an explicit attn_mask,
dropout) raises, and so do flex_attention and nn.MultiheadAttention's attention, which would
otherwise see the local shard alone. `context_parallel_unshard` gathers sharded tensors back,
as torch's does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from .attention import ring_attention
from .plan.layout import get_layout
from .plan.sharding import Sharding


@contextlib.contextmanager
def context_parallel(
    mesh: DeviceMesh,
    *,
    buffers: Sequence[torch.Tensor] | None = None,
    buffer_seq_dims: Sequence[int] | None = None,
    no_restore_buffers: set[torch.Tensor] | None = None,
    backend: str | None = None,
    transport: str | None = None,
    deterministic: bool = False,
) -> Iterator[None]:
    """torch's `context_parallel(mesh, buffers=, buffer_seq_dims=, no_restore_buffers=)` on
    fa4_cp's ring (`backend`, `transport` and `deterministic` as for `ring_attention`)."""
    _check_mesh(mesh)
    buffers, seq_dims = list(buffers or ()), list(buffer_seq_dims or ())
    if len(buffers) != len(seq_dims):
        raise ValueError(f"buffer_seq_dims: expected one sequence dim per buffer ({len(buffers)}), got {len(seq_dims)}")
    keep = {id(buffer) for buffer in no_restore_buffers or ()}
    shards = [_shard(buffer, dim, mesh, index) for index, (buffer, dim) in enumerate(zip(buffers, seq_dims))]
    originals = [None if id(buffer) in keep else buffer.clone() for buffer in buffers]
    for buffer, shard in zip(buffers, shards):
        _replace(buffer, shard)
    try:
        with _SdpaOnTheRing(mesh, backend, transport, deterministic):
            yield
    finally:
        for buffer, original in zip(buffers, originals):
            if original is not None:
                _replace(buffer, original)


def context_parallel_unshard(mesh: DeviceMesh, buffers: Sequence[torch.Tensor], seq_dims: Sequence[int]) -> list[torch.Tensor]:
    """The full tensors of sharded `buffers`, gathered from every rank of `mesh` (differentiable)."""
    from torch.distributed.nn.functional import all_gather

    _check_mesh(mesh)
    if len(buffers) != len(seq_dims):
        raise ValueError(f"seq_dims: expected one sequence dim per buffer ({len(buffers)}), got {len(seq_dims)}")
    world = mesh.size()
    unsharded = []
    for buffer, dim in zip(buffers, seq_dims):
        sharding = Sharding.dense(buffer.shape[dim] * world, world, "zigzag")
        unsharded.append(sharding.unshard(list(all_gather(buffer.contiguous(), group=mesh.get_group())), seq_dim=dim))
    return unsharded


def _check_mesh(mesh: DeviceMesh) -> None:
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        got = f"a {mesh.ndim}-D DeviceMesh" if isinstance(mesh, DeviceMesh) else type(mesh).__name__
        raise ValueError(f"mesh: expected a 1-D DeviceMesh (the context-parallel dim, e.g. mesh['cp']), got {got}")


def _shard(buffer: torch.Tensor, dim: int, mesh: DeviceMesh, index: int) -> torch.Tensor:
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"buffers[{index}]: expected a tensor, got {type(buffer).__name__}")
    if buffer.requires_grad:
        raise ValueError(f"buffers[{index}]: a tensor that requires grad cannot be sharded in place; shard its source instead")
    world, seq, zigzag = mesh.size(), buffer.shape[dim], get_layout("zigzag")
    zigzag.check_length(seq, world, f"buffers[{index}] (dim {dim})")
    return Sharding.dense(seq, world, zigzag).shard(buffer, mesh.get_local_rank(), seq_dim=dim)


def _replace(buffer: torch.Tensor, values: torch.Tensor) -> None:
    buffer.resize_(values.shape)
    buffer.copy_(values)


def _is_flex_attention(func) -> bool:
    """flex_attention reaches torch function modes as its higher-order operator (inside a
    torch.compile of its own, even in eager)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_operator

    return func is flex_attention_operator


class _SdpaOnTheRing(TorchFunctionMode):
    def __init__(self, mesh: DeviceMesh, backend: str | None, transport: str | None, deterministic: bool = False):
        super().__init__()
        self.mesh, self.backend, self.transport, self.deterministic = mesh, backend, transport, deterministic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward or _is_flex_attention(func):
            raise ValueError(
                f"{'flex_attention' if _is_flex_attention(func) else func.__name__}: under fa4_cp.context_parallel only "
                "F.scaled_dot_product_attention runs on the ring; this attention would see the local shard alone. "
                "Use SDPA, or fa4_cp.ring_attention directly"
            )
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self.attention(*args, **kwargs)

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """SDPA's signature and layout, (b, h, s, d), on the ring."""
        if attn_mask is not None:
            raise ValueError("attn_mask: an explicit mask is not supported under fa4_cp.context_parallel; use is_causal")
        if dropout_p:
            raise ValueError(f"dropout_p: must be 0 under fa4_cp.context_parallel, got {dropout_p}")
        if query.ndim != 4:
            raise ValueError(f"query: expected (batch, heads, seq, head_dim) under fa4_cp.context_parallel, got shape {tuple(query.shape)}")
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError(f"key: {key.shape[1]} heads for {query.shape[1]} query heads needs enable_gqa=True, as SDPA does")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = ring_attention(
            q, k, v, group=self.mesh, causal=is_causal, softmax_scale=scale, backend=self.backend, transport=self.transport,
            deterministic=self.deterministic,
        )
        return out.transpose(1, 2)
