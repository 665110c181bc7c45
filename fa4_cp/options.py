"""RingOptions: what a ring call asks for besides its tensors, every rule on it checked once.

Frozen and free of shapes: one RingOptions serves every sequence length of a model, and it
reaches the custom op as a string handle (handles.options_handle), a constant of a torch.compile
graph, so that a new length never recompiles for it. The rules that need the tensors (shapes,
dtype, device, the documents, whether a backend can take them) are call.py's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .comm.transport import TransportKind
from .kernels import BandMask
from .plan.layout import check_document_layout, get_layout
from .validation import check_flag, check_mask, check_softcap, check_softmax_scale, check_transport, check_ulysses_chunks


@dataclass(frozen=True)
class RingOptions:
    causal: bool
    window: tuple[int, int]
    """(left, right) as FlashAttention's window_size, -1 unbounded."""
    softmax_scale: float | None
    """None: head_dim ** -0.5, known with the tensors."""
    softcap: float | None
    layout: str
    backend: str | None
    """A backend name, or a backend object's handle (handles.backend_key)."""
    transport: TransportKind
    """As asked, FA4_CP_TRANSPORT's default applied ("auto" is resolved by the group)."""
    deterministic: bool
    ulysses_chunks: int = 1
    """Head chunks of a 2-D call, each chunk's all-to-all behind the previous chunk's ring."""

    @property
    def mask(self) -> BandMask:
        return BandMask.from_flags(self.causal, self.window)


def checked_options(
    *, documents: bool, causal: bool, window_size: tuple[int, int], softmax_scale: float | None, softcap: float | None,
    layout: str, backend: str | None, transport: str | None, deterministic: bool, ulysses_chunks: int = 1,
) -> tuple:
    """RingOptions' fields in order, checked and normalized, as plain values (torch.compile traces
    this; handles.options_handle makes the object). ValueError naming a bad argument."""
    window = check_mask(causal, window_size)
    check_flag("deterministic", deterministic)
    check_ulysses_chunks(ulysses_chunks)
    for name, value in (("layout", layout), ("transport", transport)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
    layout = check_document_layout(layout) if documents else get_layout(layout).name
    transport = check_transport(os.environ.get("FA4_CP_TRANSPORT", "auto") if transport is None else transport)
    return (
        causal, (int(window[0]), int(window[1])), check_softmax_scale(softmax_scale), check_softcap(softcap), layout, backend, transport,
        deterministic, ulysses_chunks,
    )
