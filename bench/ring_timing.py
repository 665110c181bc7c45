"""Timing and memory of one collective call in bench/ring.py, and failures agreed across ranks.

Every rank runs the call; the ranks start each timed call together (barrier), and a call's time is
the slowest rank's (MAX over ranks), so the median is the time of the whole ring.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def barrier(group: dist.ProcessGroup | None, device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(group, device_ids=[device.index])
        torch.cuda.synchronize(device)
    else:
        dist.barrier(group)


def _elapsed_ms(call: Callable[[], None], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _memory(call: Callable[[], None], device: torch.device) -> dict | None:
    """Peak allocated bytes over one call, and the bytes allocated before it (inputs, persistent
    buffers): peak - before is what the call itself needs, its outputs included."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"before_bytes": before, "peak_bytes": peak, "extra_bytes": peak - before}


def measure(call: Callable[[], None], *, warmup: int, iters: int, device: torch.device, group: dist.ProcessGroup | None = None) -> dict:
    """Median over `iters` timed calls of the slowest rank's ms in `group`, after `warmup` calls
    (the first compiles kernels) and one untimed call that measures memory."""
    for _ in range(warmup):
        call()
    memory = _memory(call, device)
    samples = []
    for _ in range(iters):
        barrier(group, device)
        samples.append(_elapsed_ms(call, device))
    slowest = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return {"ms": statistics.median(slowest.tolist()), "ms_samples": slowest.tolist(), "memory": memory}


def release_memory(device: torch.device) -> None:
    """Drop fa4_cp's cached transports, whose KV/dKV buffers persist across calls, so each
    contender starts from the same free memory."""
    from fa4_cp.comm.group import release_transports

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    release_transports()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_agreed(run: Callable[[], dict], device: torch.device) -> tuple[dict | None, str | None]:
    """(`run()`, None), or (None, error) on every rank if it raised on any (an OOM, an unsupported
    configuration): one failure neither stops the benchmark nor leaves the ranks out of step."""
    try:
        result, error = run(), None
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, and the run goes on
        result, error = None, f"{type(exc).__name__}: {exc}"[:2000]
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # also: every rank is done before buffers are freed
    release_memory(device)
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(errors) if message]
    return (None, failed[0]) if failed else (result, None)


def attempt(run: Callable[[], dict], device: torch.device) -> dict:
    """`run()`'s result, or {"error": ...} (see `run_agreed`)."""
    result, error = run_agreed(run, device)
    return {"error": error} if error else result
