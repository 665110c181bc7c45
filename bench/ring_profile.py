"""Where a ring call's time goes, from torch.profiler (CUDA activity) over a few calls.

Each call runs alone between a barrier and a device sync, inside a named range, so every GPU
activity that starts in that range belongs to the call. Kernels are sorted into categories by
name: FA4's CuTe-DSL kernels are named "kernel_cutlass_kernel_<module><class>..." (flash_attn's
and fa4_cp's), torch's own "at::native::...". The compute stream is the one that runs the most
attention time; its idle time between kernels (gaps) is the ring's waits for data plus launch
gaps. The lead-in is the time from the call's start on the host to its first compute kernel
(argument checks, the consistency check, Python).
"""

from __future__ import annotations

import collections
import os
import statistics
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.autograd import DeviceType

from ring_timing import barrier

CALL_RANGE = "fa4_cp_bench_call"
MAX_TRACE_BYTES = 10 * 2**20
GAP_BINS_US = ((10, "under_10us"), (100, "10_to_100us"), (float("inf"), "over_100us"))


def category(name: str) -> str:
    low = name.lower()
    for key in ("memcpy", "memset", "nccl", "merge"):
        if key in low:
            return key
    if "at::native" in low or "elementwise" in low:
        return "elementwise"
    return "attention"  # FA4's CuTe-DSL kernels (forward, backward, its pre/post-processing)


def _is_kernel(event) -> bool:
    return getattr(event, "device_type", None) == DeviceType.CUDA and not getattr(event, "is_user_annotation", False) and event.name != CALL_RANGE


def _union_and_gaps(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Busy time of overlapping intervals and the idle gaps between them (same unit)."""
    busy, gaps, end = 0.0, [], None
    for start, stop in sorted(intervals):
        if end is not None and start > end:
            gaps.append(start - end)
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy, gaps


def summarize(events: Iterable, wall_ms: list[float]) -> dict:
    """Per call means, in ms, of kernel time by category (compute stream / other streams),
    compute-stream busy time, span, gaps and lead-in; the top kernels by time."""
    events = list(events)
    windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == CALL_RANGE and getattr(e, "device_type", None) == DeviceType.CPU]
    calls: list[list] = [[] for _ in windows]
    for e in filter(_is_kernel, events):
        for index, (start, end) in enumerate(windows):
            if start <= e.time_range.start < end:
                calls[index].append(e)
    attention_by_stream: collections.Counter = collections.Counter()
    for e in (e for call in calls for e in call if category(e.name) == "attention"):
        attention_by_stream[getattr(e, "device_resource_id", None)] += e.time_range.elapsed_us()
    compute = attention_by_stream.most_common(1)[0][0] if attention_by_stream else None

    per_call = max(len(windows), 1)
    on_compute: collections.Counter = collections.Counter()
    elsewhere: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    busy = span = lead_in = 0.0
    gap_bins: collections.Counter = collections.Counter()
    gap_count = 0
    for (window_start, _), call in zip(windows, calls):
        intervals = []
        for e in call:
            us = e.time_range.elapsed_us()
            by_kernel[e.name] += us
            stream_is_compute = getattr(e, "device_resource_id", None) == compute
            (on_compute if stream_is_compute else elsewhere)[category(e.name)] += us
            if stream_is_compute:
                intervals.append((e.time_range.start, e.time_range.end))
        if not intervals:
            continue
        call_busy, gaps = _union_and_gaps(intervals)
        busy += call_busy
        span += max(end for _, end in intervals) - min(start for start, _ in intervals)
        lead_in += min(start for start, _ in intervals) - window_start
        gap_count += len(gaps)
        for gap in gaps:
            gap_bins[next(label for limit, label in GAP_BINS_US if gap < limit)] += gap

    def ms(counter: collections.Counter) -> dict:
        return {key: value / 1e3 / per_call for key, value in sorted(counter.items())}

    return {
        "calls": len(windows),
        "wall_ms_median": statistics.median(wall_ms) if wall_ms else None,
        "compute_stream": {
            "stream": compute,
            "kernel_ms_by_category": ms(on_compute),
            "busy_ms": busy / 1e3 / per_call,
            "span_ms": span / 1e3 / per_call,
            "gap_ms": (span - busy) / 1e3 / per_call,
            "gaps_per_call": gap_count / per_call,
            "gap_ms_by_size": ms(gap_bins),
            "lead_in_ms": lead_in / 1e3 / per_call,
        },
        "other_streams_ms_by_category": ms(elsewhere),
        "top_kernels": [
            {"name": name[:200], "category": category(name), "ms_per_call": us / 1e3 / per_call} for name, us in by_kernel.most_common(12)
        ],
    }


def profile_calls(call: Callable[[], None], *, iters: int, device: torch.device, trace_path: str | None = None) -> dict:
    """Profile `iters` calls (already warmed up) on every rank; this rank's summary. With
    `trace_path`, also a chrome trace there if it is under 10 MiB."""
    from torch.profiler import ProfilerActivity, profile, record_function

    wall_ms = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            barrier(None, device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with record_function(CALL_RANGE):
                start.record()
                call()
                end.record()
                torch.cuda.synchronize(device)
            wall_ms.append(start.elapsed_time(end))
    summary = summarize(prof.events(), wall_ms)
    summary["rank"] = dist.get_rank()
    if trace_path:
        prof.export_chrome_trace(trace_path)
        if os.path.getsize(trace_path) > MAX_TRACE_BYTES:
            os.remove(trace_path)
        else:
            summary["chrome_trace"] = os.path.basename(trace_path)
    return summary
