"""Attention with LSE partials: the kernel interface and its backends."""

from __future__ import annotations

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

_BACKENDS: dict[str, type] = {"reference": ReferenceBackend}


def get_backend(name: str | AttentionBackend | None = None) -> AttentionBackend:
    """The backend called `name` (default: the reference), or a backend object passed through."""
    if name is None:
        name = "reference"
    if not isinstance(name, str):
        return name
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(_BACKENDS)} or a backend object, got {name!r}")
    return _BACKENDS[name]()
