"""Stock transformers models (built from a config, no download) with attn_implementation
"fa4_cp_ring" on a ring of 2 gloo ranks give the loss and gradients of the unsharded model under
transformers' eager attention, for one sequence and for packed documents; and the entry refuses
what it cannot honour, a batch that was not sharded for the ring among it."""

import pytest
import torch

from ranks import run_ranks, values

transformers = pytest.importorskip("transformers")

from fa4_cp.integrations.batches import documents_from_positions, shard_batch  # noqa: E402
from fa4_cp.integrations.transformers import ATTENTION_NAME, register_ring_attention, ring_attention_forward  # noqa: E402

SEQ = 128
DOCUMENTS = [37, 64, 27]


def tiny_llama(attn_implementation: str, family: str = "llama"):
    """A 2-layer model; "granite" scales attention by attention_multiplier = 0.4, not 1/sqrt(16)."""
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    if family == "granite":
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(attention_multiplier=0.4, **common)).float()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).float()


def full_batch(packed: bool) -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 96, (1, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, 5:9] = -100  # some tokens are not predicted
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(n) for n in DOCUMENTS])[None]
        # As DataCollatorWithFlattening does: no document predicts the next one's first token.
        labels[0, batch["position_ids"][0] == 0] = -100
    return batch


def flipped(batch: dict) -> dict:
    """Another batch with the same documents: the tokens in reverse order."""
    return {**batch, "input_ids": batch["input_ids"].flip(-1), "labels": batch["labels"].flip(-1)}


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def unsharded(packed: bool, batch: dict | None = None, family: str = "llama"):
    """transformers' eager attention on one device; packed documents run one by one (its eager
    path does not separate documents from position_ids alone), their token losses summed."""
    model = tiny_llama("eager", family)
    batch = batch or full_batch(packed)
    if not packed:
        loss = model(**batch).loss
    else:
        ends = torch.tensor(DOCUMENTS).cumsum(0).tolist()
        pieces = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends)]
        counts = [int((batch["labels"][0, piece][1:] != -100).sum()) for piece in pieces]
        loss = sum(
            model(input_ids=batch["input_ids"][:, piece], labels=batch["labels"][:, piece]).loss * count
            for piece, count in zip(pieces, counts)
        ) / sum(counts)
    loss.backward()
    return loss.detach(), gradients(model)


def ring_rank(rank, world_size, packed, family):
    import torch.distributed as dist

    register_ring_attention(group=None, backend="reference")
    model = tiny_llama(ATTENTION_NAME, family)
    loss = model(**shard_batch(full_batch(packed))).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = gradients(model)
    for grad in grads.values():
        dist.all_reduce(grad)
    # numpy: tensors sent through the result queue would vanish with this process
    return total.numpy(), {name: grad.numpy() for name, grad in grads.items()}


@pytest.mark.parametrize(
    "family,packed", [("llama", False), ("llama", True), ("granite", False)], ids=["llama", "llama_packed", "granite_scaling"]
)
def test_ring_of_two_matches_the_unsharded_model(family, packed, tmp_path):
    loss, grads = unsharded(packed, family=family)
    ring_loss, ring_grads = values(run_ranks(ring_rank, 2, tmp_path, packed, family))[0]
    torch.testing.assert_close(torch.from_numpy(ring_loss), loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(torch.from_numpy(ring_grads[name]), grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_packing_matters():
    """The packed reference differs from the one-sequence one, so the packed test checks documents."""
    assert not torch.allclose(unsharded(True)[0], unsharded(False)[0])
    cu = documents_from_positions(full_batch(True)["position_ids"])
    assert cu.tolist() == [0, 37, 101, 128]


class _Layer(torch.nn.Module):
    is_causal = True

    def __init__(self, sliding_window=None):
        super().__init__()
        self.sliding_window = sliding_window


def _qkv():
    return (torch.randn(1, 4, 16, 8) for _ in range(3))


def test_refuses_dropout():
    with pytest.raises(ValueError, match="fa4_cp_ring: dropout must be 0, got 0.1"):
        ring_attention_forward(_Layer(), *_qkv(), None, dropout=0.1)


def test_refuses_an_explicit_mask():
    with pytest.raises(ValueError, match=r"fa4_cp_ring: an explicit attention mask of shape \(1, 1, 16, 16\) is not supported"):
        ring_attention_forward(_Layer(), *_qkv(), torch.ones(1, 1, 16, 16, dtype=torch.bool))


def test_refuses_a_kv_cache():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"fa4_cp_ring: 32 keys for 16 queries; .* pass use_cache=False"):
        ring_attention_forward(_Layer(), q, torch.cat([k, k], dim=2), torch.cat([v, v], dim=2), None)


def test_refuses_sliding_window_layers():
    with pytest.raises(ValueError, match=r"sliding-window layers \(sliding_window=8\) are not supported"):
        ring_attention_forward(_Layer(sliding_window=8), *_qkv(), None)


def test_refuses_padding():
    batch = full_batch(False)
    batch["attention_mask"] = torch.ones(1, SEQ, dtype=torch.long)
    batch["attention_mask"][0, -3:] = 0
    with pytest.raises(ValueError, match="attention_mask: padding is not supported under ring attention"):
        shard_batch(batch)


def test_name_is_not_taken_for_flash_attention():
    from transformers.utils.generic import is_flash_attention_requested

    assert not is_flash_attention_requested(requested_attention_implementation=ATTENTION_NAME)


def test_a_batch_not_sharded_for_the_ring_is_refused():
    """On a ring of 2, a layer called without shard_batch's marker, or with a marker that does not
    fit, raises before any communication."""
    from fa4_cp import SimulatedRing
    from fa4_cp.integrations.transformers import SHARDS_KEY, RingSetup, RingShards

    ring = SimulatedRing(2)
    group = ring.group(0)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"fa4_cp_ring: the model was called on a batch that shard_batch did not shard for this ring of 2"):
        ring_attention_forward(_Layer(), q, k, v, None, ring_setup=RingSetup(group=group))
    with pytest.raises(ValueError, match=r"sharded for 2 ranks \(zigzag, 32 local tokens\) but .* the layer got 16 tokens"):
        ring_attention_forward(_Layer(), q, k, v, None, ring_setup=RingSetup(group=group), **{SHARDS_KEY: RingShards(2, "zigzag", 32)})
    assert sum(ring.collectives.values()) == 0


def test_shard_batch_marks_the_batch_it_shards():
    from fa4_cp.integrations.transformers import SHARDS_KEY, RingShards

    assert shard_batch(full_batch(False))[SHARDS_KEY] == RingShards(1, "zigzag", SEQ)


def test_a_name_is_bound_to_one_ring():
    from fa4_cp import SimulatedRing

    ring = SimulatedRing(2)
    one, other = ring.group(0), ring.group(1)
    first = register_ring_attention(one, name="fa4_cp_ring_test")
    assert register_ring_attention(one, name="fa4_cp_ring_test") == first  # the same ring again
    with pytest.raises(ValueError, match="name: 'fa4_cp_ring_test' is already registered for another ring"):
        register_ring_attention(other, name="fa4_cp_ring_test")
    unnamed = register_ring_attention(other)
    assert unnamed.startswith(ATTENTION_NAME) and register_ring_attention(other) == unnamed


@pytest.mark.parametrize(
    "argument,value,message",
    [
        ("sliding_window", 4096, r"sliding_window=4096 \(a sliding-window layer\) is not supported yet"),
        ("s_aux", torch.zeros(4), r"attention sinks \(s_aux\) are not supported yet"),
        ("softcap", 50.0, r"softcap=50.0 \(attention logit softcapping\) is not supported yet"),
        ("output_attentions", True, r"call arguments \['output_attentions'\] are not understood"),
    ],
)
def test_call_arguments_it_cannot_honour_are_refused(argument, value, message):
    with pytest.raises(ValueError, match=message):
        ring_attention_forward(_Layer(), *_qkv(), None, **{argument: value})
