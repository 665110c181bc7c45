"""Host time of one ring call on a ring of one rank, on CPU: the front door's cost (argument
checks, call validation, plan lookup, custom-op dispatch) with tensors so small that the
reference backend's arithmetic hardly counts.

    python bench/host_call.py [--tree PATH] --out PATH

Forward alone and forward + backward, dense and packed documents, median of 200 calls after 20
warm-up calls; `--tree` runs another checkout's fa4_cp (a baseline) with the same inputs. And
the path of one fresh dense call (sys.setprofile): the fa4_cp modules its forward enters, in
order, and how often the forward and the backward enter validation.py and call.py.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from common import fa4_cp_from, record, write

CALLS, WARMUP = 200, 20


def median_us(fn) -> float:
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(CALLS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def call_path(run) -> dict:
    """fa4_cp modules entered by `run()`, in order of first entry, and the calls into
    validation.py and call.py."""
    modules: dict[str, None] = {}
    entries: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if module.startswith("fa4_cp"):
                modules.setdefault(module)
                if module in ("fa4_cp.validation", "fa4_cp.call"):
                    entries[module] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return {"modules": list(modules), "entries": dict(entries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", help="run the fa4_cp of this checkout (a baseline)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fa4_cp = fa4_cp_from(args.tree)
    torch.manual_seed(0)
    dense = [torch.randn(1, 16, 4, 16, requires_grad=True) for _ in range(3)]
    packed = [torch.randn(16, 4, 16, requires_grad=True) for _ in range(3)]
    cu_seqlens = torch.tensor([0, 5, 16], dtype=torch.int32)
    calls = {
        "dense": lambda: fa4_cp.ring_attention(*dense, causal=True, backend="reference"),
        "packed": lambda: fa4_cp.ring_attention_varlen(*packed, cu_seqlens, causal=True, backend="reference"),
    }
    fresh = [torch.randn(1, 32, 4, 16, requires_grad=True) for _ in range(3)]  # a signature no call above used
    out = None

    def fresh_forward():
        nonlocal out
        out = fa4_cp.ring_attention(*fresh, causal=True, backend="reference")

    path = {"forward": call_path(fresh_forward), "backward": call_path(lambda: out.sum().backward())}
    print(f"one dense forward enters {len(path['forward']['modules'])} fa4_cp modules; validation.py / call.py entries: "
          f"forward {path['forward']['entries']}, backward {path['backward']['entries']}")
    rows = {}
    for name, call in calls.items():
        with torch.no_grad():
            forward = median_us(call)
        rows[name] = {"forward_us": forward, "forward_backward_us": median_us(lambda: call().sum().backward())}
        print(f"{name:7} forward {rows[name]['forward_us']:.0f} us, forward+backward {rows[name]['forward_backward_us']:.0f} us")
    result = record(
        "host_call", "cpu", fa4_cp_path=str(Path(fa4_cp.__file__).parent), statistic=f"median of {CALLS} calls after {WARMUP}",
        setup="ring of one rank (group=None), reference backend, q/k/v (1, 16, 4, 16) dense or (16, 4, 16) in 2 documents", rows=rows,
        call_path=path,
    )
    write(result, args.out)


if __name__ == "__main__":
    main()
