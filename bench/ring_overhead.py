"""What the ring costs on top of the kernels: one ring call on a 1-rank group against upstream FA4.

    python bench/ring_overhead.py [--seqs 8192 32768] [--heads 32:8 32:32] [--tree PATH] --out PATH

Per configuration (bf16, head_dim 128, causal, batch 1): fa4_cp.ring_attention fwd+bwd through
autograd (the cross-rank check on, group=None: a ring of one rank) against upstream
flash_attn_func fwd+bwd on the same inputs; CUDA-event medians of interleaved rounds after warm-up,
ratio = upstream / ring. And the host time of a call (forward, and fwd+bwd) with the GPU kept
busy, for the ring and for upstream: the host path the ring adds, every launch included; and the
host time from a forward call's start to its first kernel launch (issue 24's "host path"), read
from the CUDA runtime and driver calls that the profiler records. And where the GPU waits within
a fwd+bwd call started on an idle GPU, as the timed rounds start: its kernels' busy and idle time
and the largest gaps, each between the two kernels named, from a profiler trace (CUPTI's cost per
launch included, for the ring and upstream alike).
`--tree` runs another checkout's fa4_cp (a baseline).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch
from common import fa4_cp_from, median_ms, record, write

HEAD_DIM = 128
GPU_BUSY_CYCLES = 100_000_000  # ~50 ms at the H200's clock: far longer than any call's host path


def host_us(fn, calls: int = 25) -> float:
    """Median host µs of one call of `fn` with the GPU kept busy (a sleep kernel queued first), so
    that no launch waits for the GPU: the Python path of the call, every launch included. An
    upper bound of the path from the call to its first kernel."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        torch.cuda._sleep(GPU_BUSY_CYCLES)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
MARKER_CALL = "cudaEventSynchronize"  # neither the ring nor upstream waits on an event in a call


def first_launch_us(fn, calls: int = 25) -> dict | None:
    """Host µs from the start of a call of `fn` to its first kernel launch, and to its return,
    medians over `calls` calls traced in one profiler session behind a sleep kernel (the GPU
    busy): a wait on an event long complete marks each call's start and end, and it and the
    launches are the CUDA API calls that the profiler's CUDA activity records. Both include
    CUPTI's own cost per API call, so only their comparison with upstream's, and the first's
    share of the second, mean much. Also the kernel that first launch ran (the most frequent
    over the calls). None where the trace holds no such pairs."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    mark = torch.cuda.Event()
    mark.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()  # the session's first API calls pay CUPTI's set-up
        torch.cuda._sleep(GPU_BUSY_CYCLES)
        for _ in range(calls):
            mark.synchronize()
            fn()
            mark.synchronize()
        torch.cuda.synchronize()
    traced = list(trace.profiler.kineto_results.events())
    kernel_names = {event.correlation_id(): event.name() for event in traced if str(event.device_type()).endswith("CUDA")}
    events = sorted(
        (event.start_ns(), event.duration_ns(), event.name(), event.correlation_id()) for event in traced
        if event.name() == MARKER_CALL or event.name() in LAUNCH_CALLS
    )
    marks = [index for index, (_, _, name, _) in enumerate(events) if name == MARKER_CALL]
    to_launch, to_return, first_kernels = [], [], collections.Counter()
    for begin, end in zip(marks[0::2], marks[1::2]):  # each call between its two marks
        started = events[begin][0] + events[begin][1]
        launches = [(start, correlation) for start, _, name, correlation in events[begin + 1 : end] if name in LAUNCH_CALLS]
        if launches:
            to_launch.append((launches[0][0] - started) / 1e3)
            to_return.append((events[end][0] - started) / 1e3)
            first_kernels[kernel_names.get(launches[0][1], "?")[:120]] += 1
    if not to_launch:
        return None
    return {
        "to_first_launch": statistics.median(to_launch), "to_return": statistics.median(to_return), "calls": len(to_launch),
        "first_kernel": first_kernels.most_common(1)[0][0],
    }


GAPS_KEPT = 6


def gpu_gaps(fn, calls: int = 10) -> dict:
    """A call's GPU activity when it starts on an idle GPU: from the end of a marker kernel queued
    just before the call to the end of the call's last kernel (span), the time some kernel or copy
    ran (busy), the rest (idle), and the call of median span's largest gaps with the activity on
    either side. Medians over `calls` calls in one profiler session."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(calls + 1):  # the session's first call pays CUPTI's set-up
            torch.cuda.synchronize()
            torch.cuda._sleep(1)  # the marker: the call's activity follows it
            fn()
        torch.cuda.synchronize()
    activity = sorted(
        (event.start_ns(), event.start_ns() + event.duration_ns(), event.name()) for event in trace.profiler.kineto_results.events()
        if str(event.device_type()).endswith("CUDA") and event.duration_ns() > 0
    )
    markers = [index for index, (_, _, name) in enumerate(activity) if "sleep" in name.lower() or "spin" in name.lower()]
    rows = []
    for begin, end in zip(markers[1:], [*markers[2:], len(activity)]):
        events, cursor, busy, gaps = activity[begin + 1 : end], activity[begin][1], 0, []
        previous = "the marker"
        for start, stop, name in events:
            if start > cursor:
                gaps.append(((start - cursor) / 1e3, previous[:70], name[:70]))
            busy += max(0, stop - max(start, cursor))
            if stop > cursor:
                cursor, previous = stop, name
        if events:
            rows.append({"span_us": (cursor - activity[begin][1]) / 1e3, "busy_us": busy / 1e3, "gaps": gaps})
    if not rows:
        return {}
    median = sorted(rows, key=lambda row: row["span_us"])[len(rows) // 2]
    return {
        "calls": len(rows),
        "span_us": statistics.median(row["span_us"] for row in rows),
        "busy_us": statistics.median(row["busy_us"] for row in rows),
        "idle_us": statistics.median(row["span_us"] - row["busy_us"] for row in rows),
        "largest_gaps_of_the_median_call": [
            {"us": us, "after": after, "before": before} for us, after, before in sorted(median["gaps"], reverse=True)[:GAPS_KEPT]
        ],
    }


def run_config(fa4_cp, seq: int, heads: int, kv_heads: int) -> dict:
    from flash_attn.cute import flash_attn_func

    q = torch.randn(1, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, seq, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def ring_fwd():
        return fa4_cp.ring_attention(q, k, v, causal=True, backend="fa4")

    def upstream_fwd():
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out

    def both(forward):
        def call():  # gradients taken, not added into .grad: the calls' kernels only
            torch.autograd.grad(forward(), (q, k, v), dout)
        return call

    ms = median_ms({"ring": both(ring_fwd), "upstream": both(upstream_fwd)}, iters=20)
    with torch.no_grad():
        host = {"ring_forward": host_us(ring_fwd), "upstream_forward": host_us(upstream_fwd)}
        profiled = {"ring_forward": first_launch_us(ring_fwd), "upstream_forward": first_launch_us(upstream_fwd)}
    host["ring_forward_backward"] = host_us(both(ring_fwd))
    host["upstream_forward_backward"] = host_us(both(upstream_fwd))
    gaps = {"ring": gpu_gaps(both(ring_fwd)), "upstream": gpu_gaps(both(upstream_fwd))}
    return {
        "seq": seq, "heads": heads, "kv_heads": kv_heads, "ms": ms, "upstream_over_ring": ms["upstream"] / ms["ring"],
        "host_us_gpu_busy": host, "host_us_profiled": profiled, "gpu_from_idle_fwd_bwd": gaps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--heads", nargs="+", default=["32:8", "32:32"])
    parser.add_argument("--tree", help="run the fa4_cp of this checkout (a baseline)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fa4_cp = fa4_cp_from(args.tree)

    result = record(
        "ring_overhead", "cuda", fa4_cp_path=str(Path(fa4_cp.__file__).parent), head_dim=HEAD_DIM, dtype="bfloat16", causal=True,
        statistic="median of 20 interleaved rounds after 3 warm-up calls, CUDA events; host: median of 25 calls behind a sleep kernel; "
        "profiled: medians of 25 forward calls in one profiler session behind a sleep kernel",
        rows=[],
    )
    for seq in args.seqs:
        for pair in args.heads:
            heads, kv_heads = (int(n) for n in pair.split(":"))
            row = run_config(fa4_cp, seq, heads, kv_heads)
            result["rows"].append(row)
            write(result, args.out)
            print(
                f"S={seq:<6} {heads}:{kv_heads:<3} ring {row['ms']['ring']:.3f} ms  upstream {row['ms']['upstream']:.3f} ms  "
                f"upstream/ring {row['upstream_over_ring']:.3f}  host us (fwd, fwd+bwd): ring {row['host_us_gpu_busy']['ring_forward']:.0f}, "
                f"{row['host_us_gpu_busy']['ring_forward_backward']:.0f}  upstream {row['host_us_gpu_busy']['upstream_forward']:.0f}, "
                f"{row['host_us_gpu_busy']['upstream_forward_backward']:.0f}  profiled fwd (to first launch, to return): ring {row['host_us_profiled']['ring_forward']}, "
                f"upstream {row['host_us_profiled']['upstream_forward']}", flush=True,
            )
            for name, gaps in row["gpu_from_idle_fwd_bwd"].items():
                print(f"  {name}: GPU from idle {gaps}", flush=True)


if __name__ == "__main__":
    main()
