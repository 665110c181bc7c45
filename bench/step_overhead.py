"""Host (Python) time per ring step, outside the kernels: the executor with a backend that
launches nothing and a transport that moves nothing, on CPU.

    python bench/step_overhead.py [--device cuda] [--tree DIR] [--out PATH]

CPU: a rank's forward and backward ring loops run at W = 8 and W = 64 (causal zigzag, one block
per step); the slope between them, (T(64) - T(8)) / 56, is the time of one more step, free of
the per-call work. The per-call time of `fa4_cp.ring_attention` at W = 1 (host path, autograd
included) is reported too.
CUDA: the FA4 backend's own host time per block step (forward and backward passes): host seconds
over 50 steps, then one synchronize (few enough that the launch queue never fills, so the host
never waits for the GPU).
`--tree DIR` measures the fa4_cp package in another checkout (e.g. a `git worktree` of an older
commit) with the same method. Medians of 7 rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

WORLD_SIZES = (8, 64)
ROUNDS = 7


class NullTransport:
    """Moves nothing: shifts complete at once, buffers come from `pool` (a BufferPool of the tree
    measured)."""

    stream_ordered = False
    watchdog = None

    def __init__(self, world_size: int, pool):
        self.rank, self.world_size, self._pool = 0, world_size, pool

    def buffers(self, channel, count, shape, dtype, device):
        return self._pool.slots(channel, count, shape, dtype, device)

    def shift(self, sends, recvs, offset, channel=0, lands_at=None):
        return self

    def wait(self) -> None:
        pass

    def all_gather(self, tensor):
        return [tensor] * self.world_size


class _NullPass:
    dk_scale = 1.0
    writes_rounded_varlen = False

    def __init__(self, q=None):
        self.q = q

    def step(self, *args, **kwargs) -> None:
        pass

    def dq(self) -> torch.Tensor:
        return torch.zeros_like(self.q)

    def finish_dkv(self, local, travelled, k, v, indexed=()):
        return torch.zeros_like(k), torch.zeros_like(v)

    def can_write_first(self, k) -> bool:
        return True

    def can_write_rounded(self, k) -> bool:
        return False


class NullBackend:
    name = "null"

    def forward(self, q, k, **options):
        return _NullPass()

    def forward_step(self, *args, **kwargs) -> None:  # the interface before the consolidation
        pass

    def backward(self, q, out, lse, dout, dlse, **options):
        return _NullPass(q)


def median_seconds(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append((time.perf_counter() - start) / repeats)
    return statistics.median(samples)


def make_ring(fa4_cp, world_size: int, shape: tuple[int, ...]):
    """A rank-0 Ring of `world_size` on the null transport and backend."""
    loop_package = "runtime" if importlib.util.find_spec(f"{fa4_cp.__name__}.runtime") else "parallel"  # renamed 2026-12-04
    executor = importlib.import_module(f"{fa4_cp.__name__}.{loop_package}.executor")
    mask = fa4_cp.kernels.BandMask(hi=0)
    sharding = fa4_cp.Sharding.dense(shape[1] * world_size, world_size, "zigzag")
    fields = {field.name for field in dataclasses.fields(executor.Ring)}
    if "plan" in fields:
        from_plan = importlib.import_module(f"{fa4_cp.__name__}.plan.rows")
        pool = importlib.import_module(f"{fa4_cp.__name__}.comm.buffers").BufferPool()
        plan = from_plan.rank_plan(sharding, mask, 0, torch.device("cpu"))
        return executor, executor.Ring(plan, NullTransport(world_size, pool), NullBackend(), 0.125)
    schedule = importlib.import_module(f"{fa4_cp.__name__}.parallel.schedule").build_schedule(sharding, mask)
    pool = importlib.import_module(f"{fa4_cp.__name__}.parallel.buffers").BufferPool()
    return executor, executor.Ring(sharding, schedule, NullTransport(world_size, pool), NullBackend(), 0.125)


def measure(fa4_cp) -> dict:
    shape = (1, 16, 2, 8)
    q, k, v = (torch.randn(shape) for _ in range(3))
    loops = {}
    for world_size in WORLD_SIZES:
        executor, ring = make_ring(fa4_cp, world_size, shape)
        out, lse = executor.ring_forward(ring, q, k, v)
        forward = median_seconds(lambda: executor.ring_forward(ring, q, k, v), 200)
        backward = median_seconds(lambda: executor.ring_backward(ring, q, k, v, out.to(q.dtype), lse, q, None), 200)
        loops[world_size] = {"forward_call_us": forward * 1e6, "backward_call_us": backward * 1e6}
    steps = WORLD_SIZES[1] - WORLD_SIZES[0]
    per_step = {
        kind: (loops[WORLD_SIZES[1]][f"{kind}_call_us"] - loops[WORLD_SIZES[0]][f"{kind}_call_us"]) / steps
        for kind in ("forward", "backward")
    }
    leaf = q.clone().requires_grad_()
    backend = NullBackend()  # one object, as a user passes one backend: a new one per call is a new call signature

    def public_call(backward: bool):
        out = fa4_cp.ring_attention(leaf, k, v, causal=True, backend=backend)
        if backward:
            out.sum().backward()

    return {
        "per_step_us": per_step,
        "loops": {str(w): figures for w, figures in loops.items()},
        "ring_attention_w1_call_us": {
            "forward": median_seconds(lambda: public_call(False), 200) * 1e6,
            "forward_backward": median_seconds(lambda: public_call(True), 200) * 1e6,
        },
    }


def fa4_step_host_us(fa4_cp) -> dict:
    """Host microseconds per FA4 forward and backward block step (d 128, 32:8 heads, 256 rows;
    causal blocks, as a ring's first step; every block accumulates)."""
    kernels = importlib.import_module(f"{fa4_cp.__name__}.kernels")
    mask = kernels.BandMask(hi=0)
    q = torch.randn(1, 256, 32, 128, device="cuda", dtype=torch.bfloat16)
    backend = kernels.get_backend("fa4", q)
    k, v = (torch.randn(1, 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full((1, 32, 256), -float("inf"), device="cuda", dtype=torch.float64)
    dk, dv = (torch.zeros(t.shape, device="cuda") for t in (k, v))
    if hasattr(backend, "forward"):
        forward_pass = backend.forward(q, k, softmax_scale=0.1)

        def forward_step():
            forward_pass.step(q, k, v, out, lse, mask=mask, accumulate=True)
    else:  # the interface before the consolidation

        def forward_step():
            backend.forward_step(q, k, v, out, lse, mask=mask, softmax_scale=0.1, accumulate=True)

    forward_step()
    backward_pass = backend.backward(q, out.to(q.dtype), lse, torch.randn_like(q), None, softmax_scale=0.1)

    def backward_step():
        backward_pass.step(k, v, dk, dv, q_rows=slice(None), mask=mask)

    figures = {}
    for name, step in (("forward", forward_step), ("backward", backward_step)):
        step()
        torch.cuda.synchronize()
        samples = []
        for _ in range(3 * ROUNDS):
            start = time.perf_counter()
            for _ in range(50):
                step()
            samples.append((time.perf_counter() - start) / 50)
            torch.cuda.synchronize()
        figures[name] = statistics.median(samples) * 1e6
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tree", help="a checkout whose fa4_cp to measure (default: this one)")
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(args.tree or Path(__file__).resolve().parents[1]).resolve()
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fa4_cp
    from common import RESULTS, record, today, write

    if args.device == "cuda":
        figures = {"fa4_block_step_host_us": fa4_step_host_us(fa4_cp)}
        method = f"host seconds of 50 FA4 block steps (bf16, d 128, 32:8 heads, 256 q and kv rows, causal), then a synchronize; median of {3 * ROUNDS} rounds"
    else:
        torch.set_num_threads(1)
        figures = measure(fa4_cp)
        method = (
            "rank 0's ring loop, null backend and transport, causal zigzag; per step = (T(W=64) - T(W=8)) / 56; "
            f"median of {ROUNDS} rounds of 200 calls"
        )
    result = record("step_overhead", args.device, tree=str(root), fa4_cp_path=str(Path(fa4_cp.__file__).parent), method=method, **figures)
    write(result, args.out or RESULTS / f"step_overhead_{args.device}_{today()}.json")
    for name, value in figures.items():
        print(name, value)


if __name__ == "__main__":
    main()
