"""Attention with LSE partials: the kernel interface and its backends."""

from __future__ import annotations

import functools
import warnings

import torch

from .interface import (
    LSE_ACCUMULATOR_DTYPE, AttentionBackend, BandMask, IndexedSums, VarlenRows, accumulator_dtype, returned_lse_dtype,
)
from .reference import ReferenceBackend

__all__ = [
    "AttentionBackend",
    "BandMask",
    "IndexedSums",
    "VarlenRows",
    "accumulator_dtype",
    "LSE_ACCUMULATOR_DTYPE",
    "returned_lse_dtype",
    "ReferenceBackend",
    "get_backend",
]

BACKEND_NAMES = ("auto", "fa4", "reference")
FAST_DTYPES = (torch.bfloat16, torch.float16)
_warned: set[str] = set()


def get_backend(
    name: str | AttentionBackend | None = None, q: torch.Tensor | None = None, *, backward: bool | None = None,
    v_head_dim: int | None = None,
) -> AttentionBackend:
    """The backend called `name` (one shared instance each, so its compiled kernels and bound
    configurations persist across calls), or a backend object passed through.

    "auto" (the default) is FA4 where it can take `q` (a 16-bit q on a Hopper or Blackwell GPU,
    flash-attn-4 installed), else the reference; on 16-bit CUDA inputs it warns once, with the
    reason, when it falls back. "fa4" checks `q` and says why it cannot, for a backward too when
    `backward` (default: whether q requires grad).
    """
    if name is not None and not isinstance(name, str):
        return name
    name = "auto" if name is None else name
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)} or a backend object, got {name!r}")
    if name == "reference" or (name == "auto" and (q is None or q.device.type != "cuda")):
        return _reference()
    try:
        from .fa4 import backend as fa4
    except ImportError as error:
        return _fall_back(name, q, f"the GPU stack is not importable: pip install 'fa4-cp[fa4]' ({error})")
    if q is not None:
        try:
            fa4.check_inputs(q, backward=q.requires_grad if backward is None else backward, v_head_dim=v_head_dim)
        except ValueError as error:
            return _fall_back(name, q, str(error).removeprefix("backend 'fa4': "))
    return fa4.shared_backend()


def _fall_back(name: str, q: torch.Tensor | None, reason: str) -> AttentionBackend:
    """The reference instead of FA4: refused when "fa4" was asked for; a warning, once per
    reason, when "auto" meets 16-bit CUDA inputs (slow and unexpected there)."""
    if name == "fa4":
        raise ValueError(f"backend 'fa4': {reason}")
    if q is not None and q.dtype in FAST_DTYPES and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fa4_cp: backend 'auto' runs the O(S^2) PyTorch reference on 16-bit CUDA inputs: {reason}", stacklevel=4)
    return _reference()


@functools.cache
def _reference() -> ReferenceBackend:
    return ReferenceBackend()
