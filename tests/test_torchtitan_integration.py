"""torchtitan's Llama 3 and Qwen 3 (debug flavors, built from their registries) with fa4_cp ring
attention installed by RingAttentionConverter, on 2 gloo ranks as a ring and as a 2 x 1
Ulysses x ring mesh: the loss and every gradient
against the same model unsharded under torchtitan's own SDPA attention, by FlashAttention's rule
against fp64 (error <= 2 x the fp32 unsharded model's error + a small atol), for dense sequences
and packed documents. torchtitan's trainer needs CUDA; it runs in the GPU issues."""

import pytest
import torch
import torch.nn.functional as F

from ranks import run_ranks, values

pytest.importorskip("torchtitan")

from torchtitan.models import deepseek_v3, llama3, qwen3  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402

from fa4_cp.integrations.torchtitan import IGNORE_INDEX, RingAttentionConverter, shard_titan_batch  # noqa: E402

FAMILIES = {"llama3": llama3, "qwen3": qwen3, "deepseek_v3": deepseek_v3}  # DeepSeek-V3: MLA, q and k 192, v 128
REGISTRY_OPTIONS = {"deepseek_v3": dict(attn_backend="varlen")}  # the converter reads a varlen layer's window
BATCH, SEQ, VOCAB = 2, 64, 2048
DOCUMENTS = [20, 1, 43]  # per sample: packed documents, one a single token
ATOL = 1e-6


def build(family: str, ring: bool, dtype=torch.float32):
    """The family's debug model, the same weights whichever attention it has."""
    spec = FAMILIES[family].model_registry(
        "debugmodel", converters=[RingAttentionConverter.Config()] if ring else None, **REGISTRY_OPTIONS.get(family, {}),
    )
    if not ring:
        for layer in spec.model.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    model = spec.model.build()
    model.init_states(buffer_device=torch.device("cpu"))
    if dtype == torch.float64:  # the RoPE cache is complex: widen it, never cast it to real
        for module in model.modules():
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is not None:
                    tensor.data = tensor.data.to(torch.complex128 if tensor.is_complex() else torch.float64)
    return model


def batch(packed: bool):
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels[:, 5:8] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in DOCUMENTS]).expand(BATCH, -1) if packed else None
    return tokens, labels, positions


def summed_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def unsharded(family: str, packed: bool, dtype):
    """The model on the full batch; packed documents run one by one (SDPA sees one sequence)."""
    model = build(family, ring=False, dtype=dtype)
    tokens, labels, positions = batch(packed)
    pieces = [(tokens, labels)]
    if packed:
        ends = torch.tensor(DOCUMENTS).cumsum(0).tolist()
        pieces = [(tokens[:, a:b], labels[:, a:b]) for a, b in zip([0, *ends[:-1]], ends)]
    loss = sum(summed_loss(model(t), lab) for t, lab in pieces) / int((labels != IGNORE_INDEX).sum())
    loss.backward()
    return loss.detach().double(), {name: p.grad.double() for name, p in model.named_parameters()}


# the split per batch chooses for documents; DeepSeek-V3 on a 2-D mesh: test_mesh.py's MLA cases
RUNS = [
    (family, packed, kind) for kind in ("ring", "mesh", "auto") for family in FAMILIES for packed in (False, True)
    if (kind != "auto" or packed) and (kind, family) != ("mesh", "deepseek_v3")
]


def on_ring(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fa4_cp.integrations.splits import ContextSplits

    cp = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    groups = {
        "ring": None, "mesh": init_device_mesh("cpu", (1, world_size), mesh_dim_names=("ring", "ulysses")),
        "auto": ContextSplits(cp["cp"], heads=16, kv_heads=8, head_dim=128),  # the split per batch; the debug models have 16 q heads
    }
    results = {}
    for kind, group in groups.items():
        for family in FAMILIES:
            for packed in (False, True):
                if (family, packed, kind) not in RUNS:
                    continue
                model = build(family, ring=True)
                local = shard_titan_batch(*batch(packed), group=group)
                loss = summed_loss(model(local.tokens, local.positions, local.attention_masks), local.labels) / local.num_tokens
                loss.backward()
                total = loss.detach().clone()
                dist.all_reduce(total)
                grads = {name: p.grad for name, p in model.named_parameters()}
                for grad in grads.values():
                    dist.all_reduce(grad)
                results[(kind, family, packed)] = (total, grads)
    return results


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    return values(run_ranks(on_ring, 2, tmp_path_factory.mktemp("titan"), timeout=600))[0]


def _error(result, truth) -> float:
    return (result.double() - truth).abs().max().item()



@pytest.mark.parametrize(("family", "packed", "kind"), RUNS, ids=[f"{f}-{'packed' if p else 'dense'}-{k}" for f, p, k in RUNS])
def test_two_ranks_match_the_unsharded_model(family, packed, kind, ring):
    truth_loss, truth_grads = unsharded(family, packed, torch.float64)
    fp32_loss, fp32_grads = unsharded(family, packed, torch.float32)
    ring_loss, ring_grads = ring[(kind, family, packed)]
    assert _error(ring_loss, truth_loss) <= 2 * _error(fp32_loss, truth_loss) + ATOL
    assert set(ring_grads) == set(truth_grads)
    for name, truth in truth_grads.items():
        assert not ring_grads[name].isnan().any(), name
        bound = 2 * _error(fp32_grads[name], truth) + ATOL
        assert _error(ring_grads[name], truth) <= bound, f"{name}: {_error(ring_grads[name], truth):.3e} > {bound:.3e}"


def test_the_layer_passes_the_batch_head_chunks_to_the_call():
    """A ContextSplits' head chunks reach the ring through attention_masks: on a simulated 2 x 1
    mesh, 2 chunks give the unchunked call's out (reference backend), and 3 chunks of 4 heads are
    refused naming ulysses_chunks."""
    from fa4_cp.comm.simulated import SimulatedMesh
    from fa4_cp.integrations.torchtitan import RingAttention, RingMasks

    layer = RingAttention(RingAttention.Config())
    torch.manual_seed(0)
    q = torch.randn(1, 16, 8, 16)

    def outs(group):
        rows = slice(group.rank * 8, (group.rank + 1) * 8)  # the mesh's zigzag shard of 16 tokens over its one ring rank
        local = q[:, rows]
        return [layer(local, local, local, attention_masks=RingMasks(group, 2, 8, None, "zigzag", chunks)) for chunks in (1, 2)]

    for unchunked, chunked in SimulatedMesh(2, 1).run(outs):
        torch.testing.assert_close(chunked, unchunked)
    with pytest.raises(ValueError, match="^ulysses_chunks: 3 chunks do not split"):
        SimulatedMesh(2, 1).run(lambda group: layer(q[:, :8], q[:, :8], q[:, :8], attention_masks=RingMasks(group, 2, 8, None, "zigzag", 3)))


def test_a_batch_it_did_not_shard_is_refused_and_unknown_attention_too():
    from torchtitan.models.common.attention import create_varlen_metadata_for_document

    from fa4_cp.integrations.torchtitan import RingAttention, RingMasks

    layer = RingAttention(RingAttention.Config())
    q = torch.randn(1, 8, 2, 16)
    titans_own = create_varlen_metadata_for_document(torch.arange(8)[None])  # local documents: wrong on a ring
    with pytest.raises(ValueError, match="attention_masks that fa4_cp.integrations.torchtitan.shard_titan_batch did not make"):
        layer(q, q, q, attention_masks=titans_own)
    with pytest.raises(ValueError, match="sharded into 16 local tokens, the layer got 8"):
        layer(q, q, q, attention_masks=RingMasks(None, 2, 16, None, "zigzag"))
    with pytest.raises(ValueError, match=r"arguments \['return_lse'\] are not supported"):
        layer(q, q, q, return_lse=True)
    spec = llama3.model_registry("debugmodel")
    spec.model.layers[0].attention.inner_attention = object()
    with pytest.raises(ValueError, match=r"layers\[0\]: inner attention object cannot be put on the ring"):
        RingAttentionConverter(RingAttentionConverter.Config()).convert(spec.model)


@pytest.mark.parametrize("attn_backend", ["varlen", "sdpa"])
def test_the_converter_keeps_each_layers_window_on_the_varlen_and_sdpa_backends(attn_backend):
    """gpt-oss alternates sliding-window (127, 0) and causal layers on torchtitan's varlen backend;
    Llama 3 on SDPA is causal. The converter's flags reach every layer."""
    from torchtitan.models import gpt_oss

    from fa4_cp.integrations.torchtitan import RingAttention

    expected = {}
    if attn_backend == "varlen":
        spec = gpt_oss.model_registry("debugmodel", attn_backend="varlen", converters=[RingAttentionConverter.Config()])
        expected = {index: (127, 0) if index % 2 == 0 else (-1, 0) for index in range(len(spec.model.layers))}
    else:  # torchtitan 0.3.0 builds language models with flex or varlen; SDPA is set by hand
        spec = llama3.model_registry("debugmodel")
        for layer in spec.model.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        RingAttentionConverter(RingAttentionConverter.Config(deterministic=True)).convert(spec.model)
        expected = {index: (-1, 0) for index in range(len(spec.model.layers))}
    for index, layer in enumerate(spec.model.layers):
        inner = layer.attention.inner_attention
        assert isinstance(inner, RingAttention.Config) and tuple(inner.window_size) == expected[index], (index, inner)
        assert inner.deterministic == (attn_backend == "sdpa")


def test_out_transform_takes_the_rings_out_and_lse_as_gpt_oss_sinks_need():
    """gpt-oss rescales out by sigmoid(lse - sinks) through out_transform: on the ring that equals
    the ring's own sinks (which are held to fp64 elsewhere), dense and packed."""
    from torchtitan.models.gpt_oss.model import apply_attention_sink_rescale

    import fa4_cp
    from fa4_cp.integrations.torchtitan import RingAttention, RingMasks

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 24, 4, 16, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(4, dtype=torch.float64)
    layer = RingAttention(RingAttention.Config(window_size=(5, 0)))
    transform = lambda out, lse: apply_attention_sink_rescale(out, lse, sinks)  # noqa: E731
    dense = layer(q, k, v, out_transform=transform)
    expected = fa4_cp.ring_attention(q, k, v, causal=True, window_size=(5, 0), sinks=sinks)
    assert (dense - expected).abs().max() < 1e-12
    cu = torch.tensor([0, 7, 24], dtype=torch.int32)
    packed = layer(q, k, v, attention_masks=RingMasks(None, 1, 24, cu, "balanced"), out_transform=transform)
    expected = fa4_cp.ring_attention_varlen(q[0], k[0], v[0], cu, causal=True, window_size=(5, 0), sinks=sinks)[None]
    assert (packed - expected).abs().max() < 1e-12
