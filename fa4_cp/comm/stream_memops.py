"""CUDA stream memory operations through the driver API: a GPU's front end writes a flag or waits
for one, and copies run on the copy engines. None of them occupies an SM, so signalling and
transfers overlap attention kernels that fill every SM."""

from __future__ import annotations

import ctypes
import functools

import torch

WAIT_GEQ = 0x0  # (int32)(*addr - value) >= 0: wrap-around safe for increasing counters
MEMORY_TYPE_DEVICE = 0x2


class _Memcpy2D(ctypes.Structure):
    """cuda.h's CUDA_MEMCPY2D (v2), device to device: the fields a copy between device addresses sets."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int), ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p), ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p), ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


class DriverError(RuntimeError):
    pass


@functools.cache
def _driver() -> ctypes.CDLL:
    driver = ctypes.CDLL("libcuda.so.1")
    signatures = {
        "cuStreamWriteValue32_v2": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint],
        "cuStreamWaitValue32_v2": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint],
        "cuMemcpyDtoDAsync_v2": [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p],
        "cuMemcpy2DAsync_v2": [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p],
    }
    for name, argtypes in signatures.items():
        function = getattr(driver, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return driver


def available() -> bool:
    """Whether this process can use stream memory operations (a CUDA driver that exports them)."""
    try:
        _driver()
    except (OSError, AttributeError):
        return False
    return torch.cuda.is_available()


def _check(result: int, what: str) -> None:
    if result != 0:
        raise DriverError(f"{what} failed with CUresult {result}")


def write_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """After the stream's earlier work (and a system-wide fence), store `value` at `address`."""
    _check(_driver().cuStreamWriteValue32_v2(stream.cuda_stream, address, value & 0xFFFFFFFF, 0), "cuStreamWriteValue32")


def wait_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """The stream's later work waits until the int32 at `address` has reached `value`."""
    _check(_driver().cuStreamWaitValue32_v2(stream.cuda_stream, address, value & 0xFFFFFFFF, WAIT_GEQ), "cuStreamWaitValue32")


def copy(stream: torch.cuda.Stream, destination: int, source: int, nbytes: int) -> None:
    """Device-to-device copy on a copy engine (peer-mapped addresses go over NVLink)."""
    _check(_driver().cuMemcpyDtoDAsync_v2(destination, source, nbytes, stream.cuda_stream), "cuMemcpyDtoDAsync")


def copy_2d(stream: torch.cuda.Stream, destination: int, destination_pitch: int, source: int, source_pitch: int, width: int, height: int) -> None:
    """`height` rows of `width` bytes, `source_pitch` apart from `source`, to rows `destination_pitch`
    apart from `destination`, on a copy engine: one copy gathers a head group from every row."""
    copy = _Memcpy2D(
        srcMemoryType=MEMORY_TYPE_DEVICE, srcDevice=source, srcPitch=source_pitch,
        dstMemoryType=MEMORY_TYPE_DEVICE, dstDevice=destination, dstPitch=destination_pitch,
        WidthInBytes=width, Height=height,
    )
    _check(_driver().cuMemcpy2DAsync_v2(ctypes.byref(copy), stream.cuda_stream), "cuMemcpy2DAsync")
