"""Tiny stock transformers models (built from a config, no download), their batches, and the
unsharded reference under transformers' eager attention, which implements every setting."""

from __future__ import annotations

import torch
import transformers

SEQ = 128
DOCUMENTS = [37, 64, 27]
WINDOW = 16  # transformers' sliding window: a query sees itself and the 15 tokens before it
ALTERNATING = ["sliding_attention", "full_attention"]

COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)

# family -> (model class, config class, the family's settings); each family's attention layers
# get what that family is made of: windows per layer, sinks, softcapping, scaling.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(attention_multiplier=0.4)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(sliding_window=WINDOW, pad_token_id=0)),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(sliding_window=WINDOW, pad_token_id=0)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        sliding_window=WINDOW, layer_types=ALTERNATING, attn_logit_softcapping=1.0, head_dim=16, query_pre_attn_scalar=16,
    )),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(sliding_window=WINDOW, layer_types=ALTERNATING, head_dim=16)),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(
        sliding_window=WINDOW, layer_types=ALTERNATING, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    )),
    # At their real head sizes: Gemma 3's 256; DeepSeek-V3's MLA (q and k 128 + 64 rope = 192, v 128),
    # one KV head per q head after the latent's expansion, a dense first layer then MoE.
    "gemma3_hd256": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(sliding_window=WINDOW, layer_types=ALTERNATING, head_dim=256)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32, n_group=1, topk_group=1,
    )),
}


def tiny_model(family: str, attn_implementation: str):
    """A 2-layer model of the family, the same weights for every attention implementation."""
    model_class, config_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **settings}, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).float()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("self_attn.sinks"):  # initialised near 0: make them matter
                parameter.normal_(0.0, 1.0)
    return model


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
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def unsharded(family: str, packed: bool, batch: dict | None = None):
    """Eager attention on one device; packed documents run one by one (its eager path does not
    separate documents from position_ids alone), their token losses summed."""
    model = tiny_model(family, "eager")
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


def ring_losses_and_gradients(rank: int, world_size: int, cases: list[tuple[str, bool]]) -> dict:
    """On a gloo rank: per (family, packed), the loss and every gradient, summed over the ring."""
    import torch.distributed as dist

    from fa4_cp.integrations.batches import shard_batch
    from fa4_cp.integrations.transformers import ATTENTION_NAME, register_ring_attention

    register_ring_attention(group=None, backend="reference")
    results = {}
    for family, packed in cases:
        model = tiny_model(family, ATTENTION_NAME)
        loss = model(**shard_batch(full_batch(packed))).loss
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = gradients(model)
        for grad in grads.values():
            dist.all_reduce(grad)
        # numpy: tensors sent through the result queue would vanish with this process
        results[(family, packed)] = (total.numpy(), {name: grad.numpy() for name, grad in grads.items()})
    return results
