"""Argument checks of the public API: a ValueError naming the argument, before any communication."""

from __future__ import annotations

import math

import torch

from .comm.transport import TRANSPORTS, TransportKind

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_devices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None) -> None:
    """What the custom ops' dispatch needs before the full checks (check_qkv, check_sinks, in the
    op): tensors, on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise ValueError(f"sinks: expected a tensor of per-head logits, got {type(sinks).__name__}")
    if sinks is not None and sinks.device != q.device:
        raise ValueError(f"sinks: expected the device of q ({q.device}), got {sinks.device}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, varlen: bool) -> None:
    names = "(total, heads, head_dim)" if varlen else "(batch, seq, heads, head_dim)"
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim} dims {names}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: expected dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
        if 0 in t.shape:
            raise ValueError(f"{name}: expected no empty dim, got shape {tuple(t.shape)}")
    if v.shape[:-1] != k.shape[:-1]:  # its head_dim may differ (MLA: q/k 192, v 128)
        raise ValueError(f"v: expected the shape of k {tuple(k.shape[:-1])} but for its head_dim, got {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k: expected the leading dims of q {tuple(q.shape[:-2])}, got shape {tuple(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected the head_dim of q ({q.shape[-1]}), got {k.shape[-1]}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"k: expected a head count dividing q's {q.shape[-2]} (GQA), got {k.shape[-2]}")


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")


def check_ulysses_chunks(chunks: int) -> None:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"ulysses_chunks: expected a positive int (head chunks of a 2-D call), got {chunks!r}")


def check_transport(kind: str) -> TransportKind:
    if kind not in TRANSPORTS:
        raise ValueError(f"transport: expected one of {TRANSPORTS} (or FA4_CP_TRANSPORT set to one), got {kind!r}")
    return kind


def check_mask(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    check_flag("causal", causal)
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(f"window_size: expected (left, right) ints >= -1 (-1: unbounded), got {window_size!r}")
    left, right = window_size
    if causal and right > 0:
        raise ValueError(f"window_size: a causal mask sees no key right of the query, so right must be -1 or 0; got {right}")
    return left, right


def check_softmax_scale(softmax_scale: float | None) -> float | None:
    """A positive finite scale as a float; None stays None (the call's default, head_dim**-0.5)."""
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not (
        math.isfinite(softmax_scale) and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale: expected a positive finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a positive finite float (scores become softcap * tanh(score / softcap)) or None, got {softcap!r}")
    return float(softcap)


def check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> tuple[int, ...] | None:
    """The shape of per-head sink logits (h,), for the cross-rank signature."""
    if sinks is None:
        return None
    heads = q.shape[-2]
    if not isinstance(sinks, torch.Tensor):
        raise ValueError(f"sinks: expected a tensor of {heads} per-head logits, got {type(sinks).__name__}")
    if sinks.shape != (heads,):
        raise ValueError(f"sinks: expected shape ({heads},), one logit per q head, got {tuple(sinks.shape)}")
    if sinks.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sinks: expected dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks: expected the device of q ({q.device}), got {sinks.device}")
    return tuple(sinks.shape)


def check_cu_seqlens(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """Document lengths of a global int32 cu_seqlens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1:
        got = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else repr(cu_seqlens)
        raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor, got {got}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected [0, end of document 1, ..., total], got {bounds[:8]}")
    lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens: expected non-decreasing boundaries, got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    return lengths


def heads_split(heads: int, kv_heads: int, ulysses: int) -> bool:
    """Whether `ulysses` ranks can share a layer's heads: the q heads evenly, the KV heads evenly
    or, when fewer, repeated (kv_heads a multiple or a divisor of `ulysses`)."""
    return heads % ulysses == 0 and (kv_heads % ulysses == 0 or ulysses % kv_heads == 0)


def check_heads(heads: int, kv_heads: int, ulysses: int) -> None:
    """The heads' split over a 2-D mesh's ulysses ranks."""
    if heads % ulysses:
        raise ValueError(f"q: its {heads} heads do not split over {ulysses} ulysses ranks")
    if not heads_split(heads, kv_heads, ulysses):
        raise ValueError(f"k: {kv_heads} KV heads over {ulysses} ulysses ranks: expected a multiple or a divisor of {ulysses}")
