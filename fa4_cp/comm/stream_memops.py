"""CUDA stream memory operations through the driver API: a GPU's front end writes a flag or waits
for one, and copies run on the copy engines. None of them occupies an SM, so signalling and
transfers overlap attention kernels that fill every SM."""

from __future__ import annotations

import ctypes
import functools

import torch

WAIT_GEQ = 0x0  # (int32)(*addr - value) >= 0: wrap-around safe for increasing counters


class DriverError(RuntimeError):
    pass


@functools.cache
def _driver() -> ctypes.CDLL:
    driver = ctypes.CDLL("libcuda.so.1")
    signatures = {
        "cuStreamWriteValue32_v2": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint],
        "cuStreamWaitValue32_v2": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint],
        "cuMemcpyDtoDAsync_v2": [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p],
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
