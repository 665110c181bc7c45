"""Where a training step's GPU time goes: launch/train.py under torch.profiler, one step.

    torchrun --nproc-per-node 1 bench/train_profile.py --out profile.json -- --preset 1b --cp 1 --seq-len 262144 --stop-at 2

Arguments after `--` go to launch/train.py. The profiler records the window from the end of
the first step's backward to the end of the second's (the optimizer step included), on rank 0.
Kernels are grouped by name (attention, matmul, communication, other) and the JSON lists the
heaviest kernels with their summed GPU time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from config import parse_config  # noqa: E402
from train import train  # noqa: E402

# Lower-case name fragments, first match wins.
KERNEL_GROUPS = (
    ("communication", ("nccl", "memcpy", "memset")),
    ("attention", ("flash", "fa4", "fmha", "attention", "lse")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma")),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    return next((group for group, fragments in KERNEL_GROUPS if any(f in lowered for f in fragments)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", type=int, default=30, help="kernels listed in the JSON")
    args, train_argv = parser.parse_known_args()
    train_argv = [a for a in train_argv if a != "--"]
    config = parse_config(train_argv)
    if config.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("bench/train_profile.py profiles GPU kernels: it needs --device cuda on a CUDA machine")
    profiler = profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=1, warmup=0, active=1, repeat=1))
    with profiler:
        losses = train(config, on_step=lambda step, model, loss: profiler.step())
    torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    kernels = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels)
    groups: dict[str, float] = {}
    for event in kernels:
        groups[kernel_group(event.key)] = groups.get(kernel_group(event.key), 0.0) + event.self_device_time_total / 1e6
    heaviest = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[: args.top]
    from common import record, write  # here: the tests load this file by path, without bench/ on sys.path

    result = record(
        "train_profile", "cuda", train_args=train_argv, losses=losses, kernel_seconds=total_us / 1e6, group_seconds=groups,
        kernels=[
            {"name": e.key, "group": kernel_group(e.key), "seconds": e.self_device_time_total / 1e6, "calls": e.count}
            for e in heaviest
        ],
    )
    write(result, args.out)
    print(f"kernel time in the window: {total_us / 1e6:.2f} s")
    for group, seconds in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"  {group:14s} {seconds:8.2f} s  {seconds / (total_us / 1e6):6.1%}")
    for entry in result["kernels"][:12]:
        print(f"  {entry['seconds']:8.3f} s  {entry['calls']:6d}  {entry['group']:13s} {entry['name'][:90]}")


if __name__ == "__main__":
    main()
