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
MAX_PITCH = 2**31 - 1  # bytes: CU_DEVICE_ATTRIBUTE_MAX_PITCH on the GPUs this project runs on


@dataclass(frozen=True)
class PitchedRows:
    width: int
    """Bytes of one row, contiguous."""
    pitch: int
    """Bytes from one row's start to the next's (the width where the tensor is contiguous)."""
    height: int


def pitched_rows(x: torch.Tensor) -> PitchedRows | None:
    """x's elements, in order, as `height` rows of `width` contiguous bytes `pitch` apart (one row
    where x is contiguous); None where x is empty, its last dim is strided, no one pitch describes
    its other dims, or the pitch is past what a 2-D copy takes."""
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
    if pitch < row or pitch * element > MAX_PITCH:  # overlapping (expanded) rows; a pitch the driver refuses
        return None
    return PitchedRows(row * element, pitch * element, height)


def copy_piece(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`src`'s elements, in order, into `dst`: of one shape and dtype, or one of them the other's
    contiguous bytes (a piece as it lands in a receive buffer, or as it is placed from there). On
    a GPU, pieces that one width and height of pitched rows describe go by the copy engine (no SM)."""
    same = dst.shape == src.shape and dst.dtype == src.dtype
    if dst.numel() * dst.element_size() != src.numel() * src.element_size() or not (same or dst.is_contiguous() or src.is_contiguous()):
        raise ValueError(f"a piece of {tuple(src.shape)} {src.dtype} does not fit {tuple(dst.shape)} {dst.dtype}: neither is its bytes in order")
    if same and dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src)
        return
    rows = _matching_rows(dst, src)
    if rows is not None and dst.is_cuda and src.device == dst.device and _LOCAL_COPIES.by_copy_engine():
        try:
            stream_memops.copy_2d(torch.cuda.current_stream(dst.device), dst.data_ptr(), rows[0], src.data_ptr(), *rows[1:])
            return
        except stream_memops.DriverError as error:  # the driver may refuse an intra-device pitch
            _LOCAL_COPIES.refused(error)
    if same:
        dst.copy_(src)
    elif dst.is_contiguous():
        dst.view(-1).view(src.dtype).view(src.shape).copy_(src)
    else:
        dst.copy_(src.view(-1).view(dst.dtype).view(dst.shape))


def _matching_rows(dst: torch.Tensor, src: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """(dst pitch, src pitch, width, height) of one 2-D copy of `src` into `dst`: the strided
    side's rows, the contiguous side's at the same width; where both are strided, rows of one
    width and height on both sides. None where no one copy does it."""
    if dst.is_contiguous() or src.is_contiguous():
        strided = src if dst.is_contiguous() else dst
        rows = pitched_rows(strided)
        if rows is None:
            return None
        return (rows.width, rows.pitch, rows.width, rows.height) if strided is src else (rows.pitch, rows.width, rows.width, rows.height)
    into, out_of = pitched_rows(dst), pitched_rows(src)
    if into is None or out_of is None or (into.width, into.height) != (out_of.width, out_of.height):
        return None
    return into.pitch, out_of.pitch, into.width, into.height


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
