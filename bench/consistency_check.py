"""Cost of the cross-rank consistency check: the check alone, and a small ring call with it on and off.

CPU/gloo: python bench/consistency_check.py            (2 processes)
GPU/NCCL: python bench/consistency_check.py --device cuda --world-size 2
GPU, check on the CPU: ... --device cuda --process-group-backend cpu:gloo,cuda:nccl
Writes bench/results/consistency_check_<device>_<date>.json (or --out) and prints a table (medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fa4_cp  # noqa: E402
from common import RESULTS, record, today, write  # noqa: E402
from fa4_cp.call import prepared_call  # noqa: E402
from fa4_cp.comm.group import resolve_group  # noqa: E402
from fa4_cp.consistency import check_consistency  # noqa: E402
from fa4_cp.handles import options_handle, options_of  # noqa: E402
from fa4_cp.options import checked_options  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds per call after warm-up, synchronizing the device around each call."""
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def worker(rank: int, args: argparse.Namespace, init_file: str, results) -> None:
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_of(args), init_method=f"file://{init_file}", rank=rank, world_size=args.world_size)
    group = resolve_group(None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, args.seq_local, 8, 64, device=device, dtype=dtype) for _ in range(3))
    options = options_of(options_handle(*checked_options(
        documents=False, causal=True, window_size=(-1, -1), softmax_scale=None, softcap=None, layout="zigzag", backend=None,
        transport=None, deterministic=False,
    )))
    call = prepared_call(q, k, v, None, None, options, ring_size=group.world_size, backward=False).call
    check = timed(lambda: check_consistency(group, call, device, 1), args.repeats, device)
    ring_call = {}
    for enabled in (True, False):
        fa4_cp.set_consistency_check(enabled)
        ring_call[enabled] = timed(lambda: fa4_cp.ring_attention(q, k, v, causal=True), args.repeats // 10, device)
    if rank == 0:
        results.put({"check_s": check, "ring_call_with_check_s": ring_call[True], "ring_call_without_check_s": ring_call[False]})
    dist.destroy_process_group()


def backend_of(args: argparse.Namespace) -> str:
    return args.process_group_backend or ("nccl" if args.device == "cuda" else "gloo")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq-local", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--process-group-backend", help="init_process_group's backend (default: nccl on cuda, gloo on cpu)")
    parser.add_argument("--out")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args, os.path.join(tmp, "init"), results), nprocs=args.world_size, start_method="spawn")
    figures = results.get()
    result = record(
        "consistency_check", args.device, backend=backend_of(args), world_size=args.world_size,
        seq_local=args.seq_local, statistic="median", **figures,
    )
    write(result, args.out or RESULTS / f"consistency_check_{args.device}_{today()}.json")
    overhead = figures["ring_call_with_check_s"] - figures["ring_call_without_check_s"]
    print(f"{'device':<28}{'check (us)':>12}{'call on (us)':>14}{'call off (us)':>15}{'overhead':>10}")
    print(
        f"{result['device'][:27]:<28}{figures['check_s'] * 1e6:>12.1f}{figures['ring_call_with_check_s'] * 1e6:>14.1f}"
        f"{figures['ring_call_without_check_s'] * 1e6:>15.1f}{overhead / figures['ring_call_without_check_s']:>9.1%}"
    )


if __name__ == "__main__":
    main()
