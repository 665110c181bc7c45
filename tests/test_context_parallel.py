"""fa4_cp.context_parallel, a drop-in for torch's: a model written for torch's context_parallel
(its SDPA calls, buffers sharded in place) trains on 2 gloo ranks with the unsharded model's loss
and gradients. torch's own context_parallel has no CPU path (its SDPA sharding rules cover the CUDA
kernels only), so on CPU the comparison is with the unsharded model."""

import pytest
import torch
import torch.nn.functional as F

import fa4_cp
from ranks import run_ranks, values

SEQ, VOCAB = 32, 50


class TinyModel(torch.nn.Module):
    """Embedding, one attention layer through F.scaled_dot_product_attention (GQA), rotary
    positions from a buffer, a head: the shape of a model written for torch's context_parallel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.qkv = torch.nn.Linear(32, 4 * 8 + 2 * 2 * 8)
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, tokens, labels, angles):
        x = self.embed(tokens)
        q, kv = self.qkv(x).split([32, 32], dim=-1)
        q = q.unflatten(-1, (4, 8)).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in kv.unflatten(-1, (2, 2, 8)).unbind(-3))
        q, k = rotate(q, angles), rotate(k, angles)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3)
        logits = self.head(out.transpose(1, 2).flatten(-2) + x)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def rotate(x, angles):
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def batch():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    angles = torch.arange(SEQ)[:, None] * torch.logspace(0, -2, 4)[None, :]  # (seq, head_dim / 2)
    return tokens, labels, angles


def on_ring(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    model = TinyModel()
    tokens, labels, angles = batch()
    full_tokens = tokens.clone()
    with fa4_cp.context_parallel(mesh, buffers=[tokens, labels, angles], buffer_seq_dims=[1, 1, 0], no_restore_buffers={labels}):
        sharded = tuple(tokens.shape), tuple(angles.shape)
        loss = model(tokens, labels, angles)
        loss.backward()
        (gathered,) = fa4_cp.context_parallel_unshard(mesh, [tokens], [1])
    restored = torch.equal(tokens, full_tokens) and tuple(labels.shape) == (2, SEQ // world_size)
    dist.all_reduce(loss)
    grads = {name: p.grad for name, p in model.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)
    return {
        "loss": loss.detach(), "grads": grads, "sharded": sharded, "restored": restored,
        "unshard": torch.equal(gathered, full_tokens),
    }


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    return values(run_ranks(on_ring, 2, tmp_path_factory.mktemp("cp")))


def test_the_ring_under_context_parallel_matches_the_unsharded_model(ring):
    model = TinyModel()
    loss = model(*batch())
    loss.backward()
    for result in ring:
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_buffers_are_sharded_in_place_restored_and_unsharded(ring):
    for result in ring:
        assert result["sharded"] == ((2, SEQ // 2), (SEQ // 2, 4))
        assert result["restored"], "tokens restored, labels (no_restore_buffers) left sharded"
        assert result["unshard"]


def test_what_sdpa_takes_and_the_ring_cannot_is_refused():
    from torch.distributed.device_mesh import DeviceMesh

    q = torch.randn(1, 2, 8, 4)
    mesh = DeviceMesh.__new__(DeviceMesh)  # never used: every call is refused before it
    from fa4_cp.context_parallel import _SdpaOnTheRing

    on_ring = _SdpaOnTheRing(mesh, None, None)
    with pytest.raises(ValueError, match="attn_mask: an explicit mask is not supported"):
        on_ring.attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p: must be 0"):
        on_ring.attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="needs enable_gqa=True"):
        on_ring.attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="mesh: expected a 1-D DeviceMesh"):
        with fa4_cp.context_parallel("cp", buffers=[q], buffer_seq_dims=[2]):
            pass


def test_attention_that_would_see_the_local_shard_alone_is_refused():
    """flex_attention and nn.MultiheadAttention inside the context would silently attend over this
    rank's shard only. (Eager flex_attention runs its operator inside a torch.compile of its own,
    whose error wraps the ValueError and its message.)"""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.attention.flex_attention import flex_attention

    from fa4_cp.context_parallel import _SdpaOnTheRing

    q = torch.randn(1, 2, 8, 4)
    with _SdpaOnTheRing(DeviceMesh.__new__(DeviceMesh), None, None):
        with pytest.raises((ValueError, RuntimeError), match="flex_attention: under fa4_cp.context_parallel only F.scaled_dot_product"):
            flex_attention(q, q, q)
        with pytest.raises(ValueError, match="multi_head_attention_forward: under fa4_cp.context_parallel"):
            torch.nn.MultiheadAttention(4, 1, batch_first=True)(q[0], q[0], q[0])
