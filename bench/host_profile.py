"""Where the ring's host path goes at W = 1 (a 1-rank group, the FA4 backend, the GPU kept busy so
that no launch waits for it), two ways:

    python bench/host_profile.py --out host_profile.json [--seq 8192] [--heads 32:8] [--calls 50]
    python bench/host_profile.py --dry-run --out PATH     # CPU, reference backend, tiny sizes

- spans (JSON): the wall time of the ring's own functions, each timed inclusively around its
  calls (`SPANS`), median µs per ring call, beside the forward's and the backward's whole host time.
  cProfile cannot give these: the launches through tvm-ffi are C calls it does not see, and the
  custom op's dynamo-disabled body confuses its attribution (session 12's profile put 0.88 ms
  per call in torch's backend_impl "own" time);
- cProfile (text, beside the JSON: `.txt`), sorted by own and by cumulative time, for reading;
- the whole call's host time each way it can reach the op bodies (`call_us_by_dispatch`): an eager
  call's autograd.Function (ops.EagerRingAttention), and torch's custom op, as under torch.compile
  or a dispatch mode, the way every call went before 2026-12-08;
- torch.profiler's CPU events of a few calls with Python stacks (beside the JSON: `.trace.json.gz`
  for chrome://tracing or Perfetto, and `.ops.txt`, its ops by own CPU time): what lies between the
  spans, torch's own layers included.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import gzip
import importlib
import io
import pstats
import statistics
import time
from pathlib import Path

import torch
from common import record, write

import fa4_cp
import fa4_cp.attention

GPU_BUSY_CYCLES = 400_000_000  # ~0.2 s of GPU time per call: no launch of a call waits for the GPU

SPANS = (
    # the layers around the op's body: the front door's checks, the forward op's dispatch (the
    # custom op, or an eager call's autograd.Function), what autograd calls of ours (the saved
    # context, the backward formula), the backward op's dispatch
    "fa4_cp.attention:_run", "fa4_cp.attention:ring_attention_op", "fa4_cp.ops:EagerRingAttention.forward",
    "fa4_cp.ops:EagerRingAttention.backward", "fa4_cp.ops:ring_attention_op._setup_context_fn",
    "fa4_cp.ops:ring_attention_op._backward_fn", "fa4_cp.ops:ring_attention_backward_op",
    # the op's body
    "fa4_cp.ops:_prepared", "fa4_cp.ops:backward_prepared_call", "fa4_cp.ops:check_consistency", "fa4_cp.ops:ring_run_forward",
    "fa4_cp.ops:ring_run_backward",
    # the ring run: the rank's plan and transport, the executor
    "fa4_cp.runtime.ring_run:_ring", "fa4_cp.runtime.ring_run:ring_forward", "fa4_cp.runtime.ring_run:ring_backward",
    "fa4_cp.runtime.ring_run:_dense", "fa4_cp.runtime.ring_run:_sinks_grad",
    # the executor's backward: the pass (q side: lse, delta, dq accumulator), the steps, the buffers
    "fa4_cp.runtime.executor:_backward_pass", "fa4_cp.runtime.executor:_dkv_pass",
    "fa4_cp.runtime.travelling:TravellingKV.__init__", "fa4_cp.runtime.travelling:TravellingDKV.__init__",
    # the kernels' passes: the inputs' checks, each step's launch (the q side's statistics made at
    # the first), dq's read-back, dK/dV's finish
    "fa4_cp.kernels.fa4.backend:FA4Backend.forward", "fa4_cp.kernels.fa4.backend:FA4Backend.backward",
    "fa4_cp.kernels.fa4.forward_pass_sm90:Sm90ForwardPass.__init__", "fa4_cp.kernels.fa4.forward_pass_sm90:Sm90ForwardPass.step",
    "fa4_cp.kernels.fa4.backward_pass_sm90:Sm90BackwardPass.__init__", "fa4_cp.kernels.fa4.backward_pass_sm90:Sm90BackwardPass.step",
    "fa4_cp.kernels.fa4.q_sides:DqSides.side",
    "fa4_cp.kernels.fa4.backward_pass_sm90:Sm90BackwardPass.dq", "fa4_cp.kernels.fa4.backward_pass_sm90:Sm90BackwardPass.finish_dkv",
    "fa4_cp.kernels.reference:ReferenceForwardPass.step", "fa4_cp.kernels.reference:ReferenceBackwardPass.step",
)


class SpanTimer:
    """Inclusive wall time of each span's calls, summed per ring call (`mark` ends a call)."""

    def __init__(self, spans: tuple[str, ...]):
        self.current: collections.Counter = collections.Counter()
        self.entries: collections.Counter = collections.Counter()
        self.calls: list[tuple[collections.Counter, collections.Counter]] = []
        self.absent: list[str] = []
        for span in spans:
            self._wrap(span)

    def _wrap(self, span: str) -> None:
        module_name, path = span.split(":")
        try:
            owner = importlib.import_module(module_name)
        except ImportError:  # the FA4 kernels without the GPU stack (a dry run)
            self.absent.append(span)
            return
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[span] += time.perf_counter() - start
                self.entries[span] += 1

        setattr(owner, name, timed)

    def mark(self) -> None:
        self.calls.append((self.current, self.entries))
        self.current, self.entries = collections.Counter(), collections.Counter()

    def medians_us(self) -> dict[str, dict[str, float]]:
        spans = {span for times, _ in self.calls for span in times}
        return {
            span: {
                "us": statistics.median(times[span] for times, _ in self.calls) * 1e6,
                "entries_per_call": statistics.median(entries[span] for _, entries in self.calls),
            }
            for span in sorted(spans)
        }


def trace_calls(call, keep_gpu_busy, path: Path, calls: int = 3) -> None:
    """CPU events only: CUPTI's cost per CUDA API call would weigh on the very launches measured."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as trace:
        for _ in range(calls):
            keep_gpu_busy()
            call()
    raw = path.with_suffix(".trace.json")
    trace.export_chrome_trace(str(raw))
    with open(raw, "rb") as plain, gzip.open(f"{raw}.gz", "wb") as packed:
        packed.write(plain.read())
    raw.unlink()
    table = trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    path.with_suffix(".ops.txt").write_text(f"{calls} calls of ring_attention fwd+bwd, the GPU kept busy\n{table}")


def _through_the_op(call, keep_gpu_busy, calls: int) -> dict[str, list[float]]:
    """The same calls through torch's custom op (as when something must see it), no spans."""
    eager, totals = fa4_cp.attention.runs_eager, collections.defaultdict(list)
    fa4_cp.attention.runs_eager = lambda *tensors: False
    try:
        for _ in range(3):
            call()
        for _ in range(calls):
            keep_gpu_busy()
            call(totals)
    finally:
        fa4_cp.attention.runs_eager = eager
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", default="32:8")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true", help="CPU, reference backend, 256 tokens")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, backend = ("cpu", "reference") if args.dry_run else ("cuda", "fa4")
    seq, head_dim = (256, 64) if args.dry_run else (args.seq, 128)
    heads, kv_heads = (int(n) for n in args.heads.split(":"))
    q = torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, seq, kv_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def keep_gpu_busy() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(GPU_BUSY_CYCLES)

    def call(timings: dict | None = None) -> None:
        start = time.perf_counter()
        out = fa4_cp.ring_attention(q, k, v, causal=True, backend=backend)
        returned = time.perf_counter()
        torch.autograd.backward(out, dout)
        if timings is not None:
            timings["forward"].append(returned - start)
            timings["backward"].append(time.perf_counter() - returned)

    for _ in range(3):
        call()
    profiler = cProfile.Profile()
    for _ in range(args.calls):
        keep_gpu_busy()
        profiler.enable()
        call()
        profiler.disable()
    # the spans' wrappers only after cProfile's calls, which would profile them too
    timer, totals = SpanTimer(SPANS), collections.defaultdict(list)
    for _ in range(args.calls):
        keep_gpu_busy()
        call(totals)
        timer.mark()
    if device == "cuda":
        torch.cuda.synchronize()
    by_dispatch = {"eager": totals, "op": _through_the_op(call, keep_gpu_busy, args.calls)}

    shape = f"S={seq}, heads {args.heads}, d {head_dim}, bf16, causal"
    result = record(
        "host_profile", device, shape=shape, calls=args.calls, backend=backend,
        method="a 1-rank ring, fwd + bwd through autograd, the GPU kept busy (a sleep kernel queued before each call); "
        "each span's inclusive perf_counter time summed over a call, the median over calls",
        call_us={name: statistics.median(samples) * 1e6 for name, samples in totals.items()},
        call_us_by_dispatch={
            way: {name: statistics.median(samples) * 1e6 for name, samples in timings.items()} for way, timings in by_dispatch.items()
        },
        spans=timer.medians_us(), spans_absent=timer.absent,
    )
    write(result, args.out)
    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(60)
    Path(args.out).with_suffix(".txt").write_text(f"{args.calls} calls of ring_attention fwd+bwd, {shape}\n{text.getvalue()}")
    trace_calls(call, keep_gpu_busy, Path(args.out))
    for way, timings in result["call_us_by_dispatch"].items():
        print(way, ", ".join(f"{name}: {value:.0f} us" for name, value in timings.items()))
    for span, value in result["spans"].items():
        print(f"{value['us']:8.1f} us  x{value['entries_per_call']:g}  {span}")


if __name__ == "__main__":
    main()
