"""Attention with LSE partials: the kernel interface and its backends."""

from __future__ import annotations

import torch

from .interface import LSE_ACCUMULATOR_DTYPE, AttentionBackend, BandMask, VarlenRows, accumulator_dtype
from .reference import ReferenceBackend

__all__ = [
    "AttentionBackend",
    "BandMask",
    "VarlenRows",
    "accumulator_dtype",
    "LSE_ACCUMULATOR_DTYPE",
    "ReferenceBackend",
    "get_backend",
]

BACKEND_NAMES = ("auto", "fa4", "reference")


def get_backend(name: str | AttentionBackend | None = None, q: torch.Tensor | None = None) -> AttentionBackend:
    """The backend called `name`, or a backend object passed through.

    "auto" (the default) is FA4 where it can take `q` (a 16-bit q on a Hopper or Blackwell GPU,
    flash-attn-4 installed), else the reference. "fa4" checks `q` and says why it cannot.
    """
    if name is not None and not isinstance(name, str):
        return name
    name = "auto" if name is None else name
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)} or a backend object, got {name!r}")
    if name == "reference" or (name == "auto" and (q is None or q.device.type != "cuda")):
        return ReferenceBackend()
    fa4 = _import_fa4(required=name == "fa4")
    if fa4 is None:
        return ReferenceBackend()
    if q is not None:
        try:
            fa4.check_inputs(q, backward=q.requires_grad)
        except ValueError:
            if name == "fa4":
                raise
            return ReferenceBackend()
    return fa4.FA4Backend()


def _import_fa4(required: bool):
    try:
        from .fa4 import backend
    except ImportError as error:
        if required:
            raise ValueError(f"backend 'fa4' needs the GPU stack: pip install 'fa4-cp[fa4]' ({error})") from error
        return None
    return backend
