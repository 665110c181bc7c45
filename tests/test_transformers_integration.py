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
from hf_models import FAMILIES, SEQ, full_batch, ring_losses_and_gradients, unsharded  # noqa: E402

FAMILY_CASES = [(family, packed) for family in FAMILIES for packed in (False, True) if family != "granite" or not packed]


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    """Every family's ring results, from one pair of gloo ranks (a spawn per model would cost more
    than the models)."""
    return values(run_ranks(ring_losses_and_gradients, 2, tmp_path_factory.mktemp("ring"), FAMILY_CASES, timeout=600))[0]


@pytest.mark.parametrize(("family", "packed"), FAMILY_CASES, ids=[f"{f}{'_packed' if p else ''}" for f, p in FAMILY_CASES])
def test_ring_of_two_matches_the_unsharded_model(family, packed, ring_results):
    """Llama; Granite's attention_multiplier scaling; Mistral, Phi3 and Starcoder2 windows on
    every layer; Qwen2's use_sliding_window above max_window_layers; Gemma 2 (alternating
    windows, softcapping), Gemma 3 (alternating windows; head_dim 16 and its real 256) and gpt-oss
    (alternating windows, learnable sinks, whose gradient is compared too); DeepSeek-V3's MLA at its
    real head sizes (q and k 192, v 128)."""
    loss, grads = unsharded(family, packed)
    ring_loss, ring_grads = ring_results[(family, packed)]
    torch.testing.assert_close(torch.from_numpy(ring_loss), loss, rtol=1e-5, atol=1e-6)
    assert set(ring_grads) == set(grads), f"parameters with a gradient differ: {set(grads) ^ set(ring_grads)}"
    for name, grad in grads.items():
        torch.testing.assert_close(torch.from_numpy(ring_grads[name]), grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_packing_matters():
    """The packed reference differs from the one-sequence one, so the packed test checks documents."""
    assert not torch.allclose(unsharded("llama", True)[0], unsharded("llama", False)[0])
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


def test_refuses_windows_it_cannot_read():
    with pytest.raises(ValueError, match=r"the call passed sliding_window=8 but the layer has sliding_window=4"):
        ring_attention_forward(_Layer(sliding_window=4), *_qkv(), None, sliding_window=8)
    bidirectional = _Layer(sliding_window=8)
    bidirectional.is_causal = False
    with pytest.raises(ValueError, match=r"a bidirectional sliding window \(sliding_window=8, is_causal=False\) is not supported"):
        ring_attention_forward(bidirectional, *_qkv(), None)
    unsaid = _Layer()
    unsaid.config = transformers.MistralConfig(sliding_window=32)
    with pytest.raises(ValueError, match=r"the config sets sliding_window=32 but the layer says neither"):
        ring_attention_forward(unsaid, *_qkv(), None)
    with pytest.raises(ValueError, match=r"sliding_window must be a positive int, got 0"):
        ring_attention_forward(_Layer(), *_qkv(), None, sliding_window=0)


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


def test_call_arguments_it_does_not_understand_are_refused():
    with pytest.raises(ValueError, match=r"call arguments \['output_attentions'\] are not understood"):
        ring_attention_forward(_Layer(), *_qkv(), None, output_attentions=True)


def test_a_bad_softcap_or_sinks_is_refused_naming_the_argument():
    from fa4_cp.integrations.transformers import RingSetup

    with pytest.raises(ValueError, match=r"^softcap: expected a positive finite float"):
        ring_attention_forward(_Layer(), *_qkv(), None, ring_setup=RingSetup(), softcap=-1.0)
    with pytest.raises(ValueError, match=r"^sinks: expected shape \(4,\)"):
        ring_attention_forward(_Layer(), *_qkv(), None, ring_setup=RingSetup(), s_aux=torch.zeros(3))
