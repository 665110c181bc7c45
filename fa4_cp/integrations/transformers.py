"""fa4_cp ring attention as a transformers attention implementation.

    from fa4_cp.integrations.transformers import register_ring_attention
    name = register_ring_attention(group=mesh["cp"])           # "fa4_cp_ring"
    model = LlamaForCausalLM.from_pretrained(..., attn_implementation=name)
    loss = model(**shard_batch(batch, group=mesh["cp"])).loss

The name has no "flash" in it: transformers treats any implementation whose name contains
"flash" as a FlashAttention variant (padding-free paths, dtype checks), which this is not. Each
name is bound to one ring (group, backend, transport); a second ring needs a name of its own.
It registers no mask function, so transformers builds no mask for it. Its inputs must come from
`shard_batch` (zigzag shards, global positions, pre-shifted labels, global cu_seq_lens for packed
documents): the sharded batch carries a `fa4_cp_shards` marker that reaches every attention call,
and a call on more than one rank without it is refused. A model called on the full batch on every
rank would otherwise attend over W copies of the sequence and give a wrong loss without an error.
Each layer's own settings go to the ring: its sliding window (from the `sliding_window` call
argument, `module.sliding_window`, or the layer type, as the model's eager mask applies it),
attention sinks (`s_aux`, gpt-oss) and logit softcapping (`softcap`, Gemma 2). It refuses what it
cannot honour, each with a clear error: dropout, an explicit attention mask, a KV cache, a
bidirectional or chunked window, and any call argument it does not understand.
"""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import ring_attention, ring_attention_varlen
from ..comm.mesh import world_size_of
from ..validation import check_flag

ATTENTION_NAME = "fa4_cp_ring"
SHARDS_KEY = "fa4_cp_shards"
# Call arguments that reach an attention function in a training forward and that the entry
# honours, or that belong to other layers (the loss's, the RoPE's); any other is refused.
UNDERSTOOD = {
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", SHARDS_KEY,
    "position_ids", "use_cache", "num_items_in_batch", "shift_labels", "output_router_logits",
    "sliding_window", "s_aux", "softcap",
}


@dataclass(frozen=True)
class RingSetup:
    group: object = None
    layout: str | None = None  # None: "zigzag" for one sequence, "balanced" for packed documents
    backend: str | None = None
    transport: str | None = None
    deterministic: bool = False
    ulysses_chunks: int = 1  # a 2-D group's head chunks (ring_attention's ulysses_chunks)


@dataclass(frozen=True)
class RingShards:
    """What `shard_batch` made of a batch: checked by every attention call of the model."""

    world_size: int
    layout: str
    local_len: int


_setups: dict[str, RingSetup] = {}
atexit.register(_setups.clear)  # a process group bound here must not outlive the interpreter (see comm/group.py)


def register_ring_attention(
    group: object = None, *, name: str | None = None, backend: str | None = None, transport: str | None = None,
    deterministic: bool = False,
) -> str:
    """Register the attention with transformers, bound to this ring; returns its name.
    `deterministic` as for `ring_attention`: bitwise-reproducible gradients.

    A name is bound to one ring: registering it again with the same ring is a no-op, with another
    ring it raises (models built with the name would silently switch rings). Without `name`,
    "fa4_cp_ring" is used if it is free or already bound to this ring, else "fa4_cp_ring_2", ...
    """
    from transformers import AttentionInterface

    check_flag("deterministic", deterministic)
    setup = RingSetup(group=group, backend=backend, transport=transport, deterministic=deterministic)
    if name is None:
        name = next(n for n in _names() if n not in _setups or _same_setup(_setups[n], setup))
    existing = _setups.get(name)
    if existing is not None and not _same_setup(existing, setup):
        raise ValueError(
            f"name: {name!r} is already registered for another ring ({existing}); register this one under a name of its own"
        )
    _setups[name] = setup
    AttentionInterface.register(name, _entry(name))
    return name


def rebind_ring(name: str, group: object, ulysses_chunks: int = 1) -> object:
    """Move a registered attention to another group of the same ranks (the accelerate plugin's
    split chosen per batch), with that split's head chunks: the models built with the name follow
    it. Returns the group."""
    _setups[name] = dataclasses.replace(_setups[name], group=group, ulysses_chunks=ulysses_chunks)
    return group


def is_ring_attention(name: str | None) -> bool:
    """Whether `name` is an attention implementation registered here."""
    return name in _setups


def _names():
    yield ATTENTION_NAME
    number = 2
    while True:
        yield f"{ATTENTION_NAME}_{number}"
        number += 1


def _same_setup(a: RingSetup, b: RingSetup) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):  # groups that cannot be compared are different
        return False


def _entry(name: str) -> Callable:
    # Looks its ring up per call rather than holding it, so transformers' registry keeps no group alive.
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return ring_attention_forward(module, query, key, value, attention_mask, scaling, dropout, ring_setup=_setups[name], **kwargs)

    return attention


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    ring_setup: RingSetup | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q, k, v (b, h, s, d) -> (out (b, s, h, d), None)."""
    setup = ring_setup or _setups.get(ATTENTION_NAME, RingSetup())
    _refuse_unsupported(module, query, key, attention_mask, dropout, kwargs)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    layout = setup.layout or ("zigzag" if cu_seqlens is None else "balanced")
    _check_sharded(kwargs.get(SHARDS_KEY), query.shape[2], world_size_of(setup.group), layout)
    causal = getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    options = dict(
        group=setup.group, causal=causal, window_size=_window_size(module, kwargs.get("sliding_window"), causal),
        softmax_scale=scaling, softcap=kwargs.get("softcap"), sinks=_sinks(module, kwargs.get("s_aux")),
        layout=layout, backend=setup.backend, transport=setup.transport, deterministic=setup.deterministic,
        ulysses_chunks=setup.ulysses_chunks,
    )
    if cu_seqlens is None:
        return ring_attention(q, k, v, **options), None
    if kwargs.get("cu_seq_lens_k") is not None and not torch.equal(kwargs["cu_seq_lens_k"].cpu(), cu_seqlens.cpu()):
        raise ValueError(f"{ATTENTION_NAME}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over packed documents)")
    if q.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME}: packed documents (cu_seq_lens_q) need batch size 1, got {q.shape[0]}")
    out = ring_attention_varlen(q[0], k[0], v[0], cu_seqlens.to(device="cpu", dtype=torch.int32), **options)
    return out[None], None


def _check_sharded(shards: RingShards | None, seq_len: int, world_size: int, layout: str) -> None:
    if world_size == 1 and shards is None:
        return  # a ring of one: the full batch is the shard
    if shards is None:
        raise ValueError(
            f"{ATTENTION_NAME}: the model was called on a batch that shard_batch did not shard for this ring of "
            f"{world_size} ranks (no {SHARDS_KEY!r} in the model's keyword arguments). Pass batches through "
            "fa4_cp.integrations.batches.shard_batch (RingAttentionPlugin.shard and RingAttentionTrainer do): on the "
            f"full batch each rank would attend over {world_size} copies of the sequence"
        )
    if (shards.world_size, shards.layout) != (world_size, layout) or shards.local_len != seq_len:
        raise ValueError(
            f"{ATTENTION_NAME}: the batch was sharded for {shards.world_size} ranks ({shards.layout}, {shards.local_len} "
            f"local tokens) but this ring has {world_size} ranks ({layout}) and the layer got {seq_len} tokens"
        )


def _window_size(module: torch.nn.Module, passed: int | None, causal: bool) -> tuple[int, int]:
    """The layer's window as the model's eager mask applies it. transformers' sliding window W
    lets a query see itself and the W - 1 tokens before it: window_size (W - 1, 0)."""
    own = getattr(module, "sliding_window", None)
    if passed is not None and own is not None and passed != own:
        raise ValueError(f"{ATTENTION_NAME}: the call passed sliding_window={passed} but the layer has sliding_window={own}")
    window = passed if passed is not None else own
    config = getattr(module, "config", None)
    if window is None and (getattr(module, "layer_type", None) == "sliding_attention" or getattr(module, "is_sliding", False)):
        window = getattr(config, "sliding_window", None)
        if window is None:
            raise ValueError(f"{ATTENTION_NAME}: a sliding-attention layer whose config has no sliding_window")
    if window is None and getattr(config, "sliding_window", None) is not None and not getattr(config, "layer_types", None):
        raise ValueError(
            f"{ATTENTION_NAME}: the config sets sliding_window={config.sliding_window} but the layer says neither that "
            "it slides nor that it does not; refusing rather than guessing its mask"
        )
    if getattr(config, "attention_chunk_size", None):
        raise ValueError(f"{ATTENTION_NAME}: chunked attention (attention_chunk_size={config.attention_chunk_size}) is not supported")
    if window is None:
        return (-1, -1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{ATTENTION_NAME}: sliding_window must be a positive int, got {window!r}")
    if not causal:
        raise ValueError(f"{ATTENTION_NAME}: a bidirectional sliding window (sliding_window={window}, is_causal=False) is not supported")
    return (window - 1, 0)


def _sinks(module: torch.nn.Module, passed: torch.Tensor | None) -> torch.Tensor | None:
    """gpt-oss passes its sinks as s_aux; its eager attention reads module.sinks, the same tensor."""
    own = getattr(module, "sinks", None)
    if passed is not None and isinstance(own, torch.Tensor) and passed is not own:
        raise ValueError(f"{ATTENTION_NAME}: the call passed s_aux but the layer has other sinks (module.sinks)")
    return passed if passed is not None else own if isinstance(own, torch.Tensor) else None


def _refuse_unsupported(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
    kwargs: dict,
) -> None:
    unknown = sorted(set(kwargs) - UNDERSTOOD)
    if unknown:
        raise ValueError(f"{ATTENTION_NAME}: call arguments {unknown} are not understood; refusing them rather than dropping them")
    if key.shape[2] != query.shape[2]:
        # A KV cache prepends earlier keys; under checkpointing its recompute appends them twice.
        raise ValueError(
            f"{ATTENTION_NAME}: {key.shape[2]} keys for {query.shape[2]} queries; ring attention trains on whole "
            "sequences without a KV cache: pass use_cache=False (or set it in the model config)"
        )
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: dropout must be 0, got {dropout} (set the model config's attention_dropout to 0)")
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME}: an explicit attention mask of shape {tuple(attention_mask.shape)} is not supported; "
            "pack documents instead of padding (shard_batch turns position_ids into cu_seq_lens)"
        )
