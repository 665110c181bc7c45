"""Replaying one rank's share of a ring call on one GPU: its plan, the real kernels, no transfers.

A rank's GPU work in a ring call is its plan's blocks plus the executor's own kernels (fills,
adds); the values the KV buffers hold do not change it. So a rank can be replayed alone: the
executor runs with a transport that moves nothing (every buffer keeps its random contents) and a
backend that times each block's kernels with CUDA events. Summed over blocks that is the rank's
attention time, per ring step; around the whole call, all of its kernels. Each call is timed twice:
with its launches queued behind a sleep kernel, so that the GPU never waits for the host (its GPU
time: what a training step pays while the host runs ahead, and what the figures are), and from an
idle GPU, paced by the host's launches (`*_paced_ms`; a short rank's small kernels can wait on the
host there). Bytes per hop follow from the buffers' shapes. bench/varlen.py, bench/mesh_replay.py
and bench/magi_replay.py use it. On CPU (a dry run of those benchmarks with the reference backend)
the host clock stands in for CUDA events.
"""

from __future__ import annotations

import statistics
import time

import torch

from common import queue_ahead
from fa4_cp.comm.buffers import BufferPool
from fa4_cp.runtime.executor import Ring, ring_backward, ring_forward
from fa4_cp.plan.rows import RankPlan, rank_plan
from step_overhead import NullTransport


class _HostMark:
    """A CUDA event's two methods on the host clock, for CPU dry runs."""

    def record(self) -> None:
        self.seconds = time.perf_counter()

    def elapsed_time(self, end: _HostMark) -> float:
        return (end.seconds - self.seconds) * 1e3


def mark(device: torch.device):
    """A point in the device's time: a CUDA event, or the host clock on CPU."""
    return torch.cuda.Event(enable_timing=True) if device.type == "cuda" else _HostMark()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedPass:
    def __init__(self, inner, log: list, device: torch.device):
        self.inner, self.log, self.device = inner, log, device

    def step(self, *args, **kwargs) -> None:
        start, end = mark(self.device), mark(self.device)
        start.record()
        self.inner.step(*args, **kwargs)
        end.record()
        self.log.append((start, end))

    def dq(self) -> torch.Tensor:
        return self.inner.dq()

    @property
    def writes_rounded_varlen(self) -> bool:
        return self.inner.writes_rounded_varlen

    @property
    def dk_scale(self) -> float:
        return self.inner.dk_scale

    def finish_dkv(self, local, travelled, k, v, indexed=()):
        return self.inner.finish_dkv(local, travelled, k, v, indexed)

    def can_write_first(self, k) -> bool:
        return self.inner.can_write_first(k)

    def can_write_rounded(self, k) -> bool:
        return self.inner.can_write_rounded(k)


class TimedBackend:
    """A backend whose passes record CUDA events around every block step."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.forward_log: list = []
        self.backward_log: list = []

    def forward(self, q, k, **options):
        return _TimedPass(self.inner.forward(q, k, **options), self.forward_log, q.device)

    def backward(self, q, *args, **kwargs):
        return _TimedPass(self.inner.backward(q, *args, **kwargs), self.backward_log, q.device)


def _per_step_ms(plan: RankPlan, log: list) -> list[float]:
    """Block times (ms) summed per planned step; blocks run in plan order."""
    times = iter(start.elapsed_time(end) for start, end in log)
    return [sum(next(times) for _ in step.blocks) for step in plan.steps]


def replay_rank(
    sharding, mask, rank: int, heads: int, kv_heads: int, head_dim: int, backend, iters: int = 3, device: torch.device | None = None,
) -> dict:
    """Median ms of one rank's forward and backward (all kernels), its attention kernels per
    ring step, and the bytes of its hops. Inputs are random: the cost does not depend on values."""
    device = device or torch.device("cuda")
    plan = rank_plan(sharding, mask, rank, device)
    timed = TimedBackend(backend)
    ring = Ring(plan, NullTransport(sharding.world_size, BufferPool()), timed, head_dim**-0.5)
    rows = (sharding.local_len,) if sharding.varlen else (1, sharding.local_len)
    q = torch.randn(*rows, heads, head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(*rows, kv_heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    def forward() -> tuple[torch.Tensor, torch.Tensor]:  # as a call with nothing to add to out: the rounding timed too
        out, lse = ring_forward(ring, q, k, v, rounded=True)
        return out.to(q.dtype), lse

    out, lse = forward()
    ring_backward(ring, q, k, v, out, lse, dout, None)
    totals: dict[tuple[str, bool], list[float]] = {(name, paced): [] for name in ("forward", "backward") for paced in (False, True)}
    steps: dict[str, list[list[float]]] = {"forward": [], "backward": []}
    for _ in range(iters):
        for name, run, log in (
            ("forward", forward, timed.forward_log),
            ("backward", lambda: ring_backward(ring, q, k, v, out, lse, dout, None), timed.backward_log),
        ):
            for paced in (False, True):
                log.clear()
                start, end = mark(device), mark(device)
                if not paced:
                    queue_ahead(device.type)
                start.record()
                run()
                end.record()
                synchronize(device)
                totals[name, paced].append(start.elapsed_time(end))
                if not paced:
                    steps[name].append(_per_step_ms(plan, log))
    received_rows, hops = _received_rows(plan, sharding.local_len)
    kv_bytes = 2 * received_rows // max(hops, 1) * kv_heads * head_dim * 2
    return {
        "rank": rank,
        "forward_ms": statistics.median(totals["forward", False]),
        "backward_ms": statistics.median(totals["backward", False]),
        "forward_paced_ms": statistics.median(totals["forward", True]),
        "backward_paced_ms": statistics.median(totals["backward", True]),
        "forward_attention_ms": statistics.median(sum(s) for s in steps["forward"]),
        "backward_attention_ms": statistics.median(sum(s) for s in steps["backward"]),
        "steps": [step.step for step in plan.steps],
        "forward_step_attention_ms": [statistics.median(column) for column in zip(*steps["forward"])],
        "backward_step_attention_ms": [statistics.median(column) for column in zip(*steps["backward"])],
        "kv_hop_bytes": kv_bytes,  # on average over the rank's hops
        "dkv_hop_bytes": 2 * kv_bytes,  # fp32 partial sums of 16-bit K and V (a chain may carry more)
    }


def _received_rows(plan: RankPlan, local_len: int) -> tuple[int, int]:
    """KV rows the rank receives in a pass over all its streams' hops, and how many hops."""
    rows = hops = 0
    for stream in plan.streams:
        for position, step in enumerate(stream.steps):
            if step % plan.world_size:
                held = stream.rows(stream.origin(plan.rank, plan.world_size, position), position)
                rows, hops = rows + (local_len if held is None else held), hops + 1
    return rows, hops
