"""What every benchmark result records, and where it is written.

Each JSON carries the benchmark's name, the UTC date, the device, the git commit (FA4_CP_GIT_COMMIT
where the tree has no .git, as on a device machine that got a copy of it), the exact command line,
and the torch version, so that a quoted figure can be traced to the run that produced it.
"""

from __future__ import annotations

import datetime
import gzip
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import statistics

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def load_result(path: str | Path) -> dict:
    """A result JSON, gzipped (.json.gz, as bench/results keeps the larger ones) or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as file:
        return json.load(file)


def fa4_cp_from(tree: str | None):
    """fa4_cp, from another checkout's tree when `tree` is given (a baseline), else this one."""
    if tree:
        sys.path.insert(0, str(Path(tree).resolve()))
    import fa4_cp

    return fa4_cp


def document_sharding(fa4_cp, lengths, ring: int, ulysses: int = 1):
    """The balanced layout's placement of `lengths` over the ring of a `ulysses` x `ring` mesh, in
    the given fa4_cp; one from before 2026-12-06's session 18 placed documents alike at any split."""
    if "ulysses" in inspect.signature(fa4_cp.Sharding.documents).parameters:
        return fa4_cp.Sharding.documents(lengths, ring, "balanced", ulysses)
    return fa4_cp.Sharding.documents(lengths, ring, "balanced")


def add_forward_option_arguments(parser) -> None:
    """The FA4 forward's options that a run may turn off, to measure what they bring."""
    parser.add_argument(
        "--no-pack-gqa", action="store_true", help="the forward's merging kernels without q heads packed (forward_pass_sm90.PACK_GQA off)",
    )
    parser.add_argument(
        "--no-rounded-varlen", action="store_true",
        help="the kept documents merged into fp32 out like the others (forward_pass_sm90.ROUNDED_VARLEN off)",
    )


def apply_forward_options(args) -> dict:
    """Turns off the options `args` names on the FA4 forward (of the fa4_cp that `fa4_cp_from` put
    first on the path); returns the options as the run has them, for the result's JSON."""
    try:
        from fa4_cp.kernels.fa4 import forward_pass_sm90
    except ImportError as error:  # no CuTe DSL here (a CPU dry run): the options do not apply
        if args.no_pack_gqa or args.no_rounded_varlen:
            raise SystemExit(f"--no-pack-gqa / --no-rounded-varlen: the FA4 forward does not import here ({error})")
        return {}
    if args.no_pack_gqa:
        forward_pass_sm90.PACK_GQA = False
    if args.no_rounded_varlen:
        forward_pass_sm90.ROUNDED_VARLEN = False
    return {"forward_pack_gqa": forward_pass_sm90.PACK_GQA, "forward_rounded_varlen": forward_pass_sm90.ROUNDED_VARLEN}


QUEUE_AHEAD_CYCLES = 50_000_000  # about 25 ms of GPU clock: longer than any timed call's host time


def queue_ahead(device_type: str = "cuda") -> None:
    """Keep the GPU busy while the host queues what follows, so that a timing taken after it is
    GPU time, never a wait for the host's launches (nothing to do on CPU)."""
    if device_type == "cuda":
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)


def median_ms(fns: dict, warmup: int = 3, iters: int = 15, queued: bool = False) -> dict[str, float]:
    """Median CUDA-event time of each function; rounds interleave them so drift hits all alike.
    `queued`: each call's launches queued behind a sleep kernel (`queue_ahead`): GPU time only."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            if queued:
                queue_ahead()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def git_commit() -> str:
    if os.environ.get("FA4_CP_GIT_COMMIT"):
        return os.environ["FA4_CP_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}"


def device_name(device: torch.device | str = "cuda") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def record(benchmark: str, device: torch.device | str, **fields) -> dict:
    """A result with its provenance first."""
    return {
        "benchmark": benchmark,
        "date": today(),
        "device": device_name(device),
        "git_commit": git_commit(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        **fields,
    }


def write(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
