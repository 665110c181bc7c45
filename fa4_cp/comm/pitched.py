"""Tensors whose bytes are rows of one width at one pitch: what a copy engine moves in one 2-D copy
(cuMemcpy2DAsync), with no SM and no send buffer. A head group of a contiguous (rows, heads, d)
tensor is one: the group's heads lie together in each row, and the rows lie a row of all heads
apart. A transport that copies into its peers takes such a piece as it lies (comm/transport.py);
what arrives lands contiguous, and is placed from there into a head group of the receiver's
tensor the same way (comm/all_to_all.py)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from . import stream_memops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PitchedRows:
    width: int
    """Bytes of one row, contiguous."""
    pitch: int
    """Bytes from one row's start to the next's (the width where the tensor is contiguous)."""
    height: int


def pitched_rows(x: torch.Tensor) -> PitchedRows | None:
    """x's elements, in order, as `height` rows of `width` contiguous bytes `pitch` apart (one row
    where x is contiguous); None where x is empty, its last dim is strided, or no one pitch
    describes its other dims."""
    return _pitched(tuple(x.shape), x.stride(), x.element_size()) if x.numel() else None


@functools.lru_cache(maxsize=1024)  # a call's exchanges ask for the same few layouts, every call
def _pitched(shape: tuple[int, ...], strides: tuple[int, ...], element: int) -> PitchedRows | None:
    dims = [(size, stride) for size, stride in zip(shape, strides) if size != 1]
    if dims and dims[-1][1] != 1:
        return None
    inner, row = len(dims), 1  # the contiguous trailing dims make a row
    while inner and dims[inner - 1][1] == row:
        inner -= 1
        row *= dims[inner][0]
    if not inner:
        return PitchedRows(row * element, row * element, 1)
    height, pitch = dims[inner - 1]
    for outer in range(inner - 2, -1, -1):  # the other dims must step whole rows on
        if dims[outer][1] != dims[outer + 1][1] * dims[outer + 1][0]:
            return None
        height *= dims[outer][0]
    if pitch < row:  # overlapping (expanded) rows
        return None
    return PitchedRows(row * element, pitch * element, height)


def copy_piece(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`src`'s elements, in order, into `dst`: of one shape and dtype, or one of them the other's
    contiguous bytes (a piece as it lands in a receive buffer, or as it is placed from there). On
    a GPU, a piece of pitched rows beside a contiguous one goes by the copy engine (no SM)."""
    if dst.shape == src.shape and dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src)
        return
    if dst.numel() * dst.element_size() != src.numel() * src.element_size() or not (dst.is_contiguous() or src.is_contiguous()):
        raise ValueError(f"a piece of {tuple(src.shape)} {src.dtype} does not fit {tuple(dst.shape)} {dst.dtype}: neither is its bytes in order")
    strided, contiguous = (src, dst) if dst.is_contiguous() else (dst, src)
    rows = pitched_rows(strided)
    if rows is not None and dst.is_cuda and src.device == dst.device and _LOCAL_COPIES.by_copy_engine():
        dst_pitch, src_pitch = (rows.width, rows.pitch) if strided is src else (rows.pitch, rows.width)
        try:
            stream = torch.cuda.current_stream(dst.device)
            stream_memops.copy_2d(stream, dst.data_ptr(), dst_pitch, src.data_ptr(), src_pitch, rows.width, rows.height)
            return
        except stream_memops.DriverError as error:  # the driver may refuse an intra-device pitch
            _LOCAL_COPIES.refused(error)
    typed = contiguous.view(-1).view(strided.dtype).view(strided.shape)
    if strided is src:
        typed.copy_(src)
    else:
        dst.copy_(typed)


class _LocalCopies:
    """Whether this process copies a local piece of pitched rows on the copy engine: where the
    driver has the stream memory operations, until it refuses one such copy."""

    def __init__(self):
        self._verdict: bool | None = None

    def by_copy_engine(self) -> bool:
        if self._verdict is None:
            self._verdict = stream_memops.available()
        return self._verdict

    def refused(self, error: Exception) -> None:
        self._verdict = False
        log.warning("fa4_cp: the CUDA driver refused a local 2-D copy (%s); such pieces are copied by SM kernels from now on", error)


_LOCAL_COPIES = _LocalCopies()
