"""Kernel benchmark on one GPU: fa4_cp's FA4 backend against upstream FA4 and cuDNN SDPA.

    python bench/kernels.py            (the full grid; a few minutes on an H200)

Forward: ours with the merge fused in the epilogue (accumulating, and first write; with GQA also
with the q heads of a KV head packed into its rows, staged), ours as a ring of one rank launches
it (upstream's own kernel writing 16-bit out, the lse widened), ours with upstream's forward plus
the stand-alone merge kernel, upstream flash_attn_func, cuDNN SDPA; ours
is one step of a forward pass made once, as in a ring call.
Backward: ours as a ring call's first step (preprocess, kernel, dq read-back; the kernel writes
its fp32 dK/dV first with one q head per kv head, else adds into a buffer zeroed first, as the
ring's first step does; until 2026-12-07 it always added, which no ring step does first), ours as a ring of
one rank launches it (with one q head per kv head the kernel writes finished 16-bit dK/dV; else
fp32 sums zeroed first, then the finish), ours as one more
step of a ring call already under way (kernel, dK/dV added into fp32), upstream's backward,
cuDNN's (autograd of SDPA). TFLOPs count 2·S²·H·(d + d_v) forward (4·S²·H·d when v has q's
head_dim) and 2.5x that backward, halved when causal. `--head-dims 256 192/128` adds today's
models' shapes (the backend runs them forward and backward since their GPU tests passed); no
cuDNN row where cuDNN refuses the shape. Times are CUDA-event medians after warm-up, the contenders interleaved,
each call's launches queued behind a sleep kernel: GPU time, so that a host path slower than the
kernels (a ring call's Python before its first launch) does not count here; bench/ring_overhead.py
times whole calls with their host path. `--host-paced`: from an idle GPU, as this bench timed
until 2026-12-06 (session 17), where at 8K a call's host path before its first kernel counts.
Also measures the first call of a new configuration with a cold and a warm on-disk compile
cache, each in a fresh process. Writes bench/results/kernels_<gpu>_<date>.json, prints a table.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import median_ms, record, today, write  # noqa: E402
from fa4_cp.kernels import LSE_ACCUMULATOR_DTYPE, BandMask  # noqa: E402
from fa4_cp.kernels.fa4.backend import FA4Backend  # noqa: E402
from fa4_cp.kernels.fa4.forward_pass_sm90 import Sm90ForwardPass  # noqa: E402

DIMS = ("64", "128", "256", "192/128")  # head_dim, or q/k head_dim / v head_dim
GRID = [
    (seq, heads, kv_heads, dims, causal)
    for seq in (8192, 32768, 65536)
    for heads, kv_heads in ((32, 32), (32, 8))
    for dims in DIMS
    for causal in (True, False)
    # upstream's Hopper GQA backward takes v of k's head_dim only (and MLA trains as MHA)
    if not ("/" in dims and kv_heads != heads)
]


def head_dims(spec: str) -> tuple[int, int]:
    dim, _, dim_v = spec.partition("/")
    return int(dim), int(dim_v or dim)

FIRST_CALL = """
import time, torch, sys
sys.path.insert(0, {root!r})
from fa4_cp.kernels import BandMask
from fa4_cp.kernels.fa4.forward_pass_sm90 import forward_partials_sm90
q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
out = torch.zeros(q.shape, device="cuda"); lse = torch.full((1, 16, 4096), -float("inf"), device="cuda", dtype=torch.float64)
torch.cuda.synchronize(); start = time.perf_counter()
forward_partials_sm90(q, k, v, out, lse, mask=BandMask(hi=0), softmax_scale=0.1, accumulate=True, varlen=None)
torch.cuda.synchronize(); print(time.perf_counter() - start)
"""


def run_config(
    seq: int, heads: int, kv_heads: int, dims: str, causal: bool, queued: bool = True, breakdown: bool = False, forward_only: bool = False,
) -> dict:
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.interface import _flash_attn_bwd

    dim, dim_v = head_dims(dims)
    q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, seq, kv_heads, dim_v, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(1, seq, heads, dim_v, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(dout.shape, device="cuda", dtype=torch.float32)
    lse = torch.full((1, heads, seq), -math.inf, device="cuda", dtype=LSE_ACCUMULATOR_DTYPE)
    mask = BandMask(hi=0) if causal else BandMask()
    scale = dim**-0.5
    fused, unfused = FA4Backend(), FA4Backend(fused_merge=False)

    def ours(backend, accumulate: bool):
        forward = backend.forward(q, k, softmax_scale=scale)
        return lambda: forward.step(q, k, v, out, lse, mask=mask, accumulate=accumulate)

    q_t, k_t, v_t = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))

    def cudnn_forward():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal, enable_gqa=kv_heads != heads)

    out16, lse32 = torch.empty_like(dout), torch.empty((1, heads, seq), device="cuda", dtype=torch.float32)

    def ours_ring_of_one():
        """What a ring call of one rank launches (runtime/executor.py): upstream's own kernel
        writes 16-bit out, and the lse widens to fp64."""
        fused.forward(q, k, softmax_scale=scale).step(q, k, v, out16, lse32, mask=mask, accumulate=False, write_rounded=True)
        lse32.to(LSE_ACCUMULATOR_DTYPE)

    forward_contenders = contenders = {
        "fa4_cp_fwd_merge": ours(fused, True),
        "fa4_cp_fwd_first": ours(fused, False),
        "fa4_cp_fwd_ring_of_one": ours_ring_of_one,
        "fa4_cp_fwd_merge_kernel": ours(unfused, True),
        "upstream_fa4_fwd": lambda: flash_attn_func(q, k, v, causal=causal),
        "cudnn_sdpa_fwd": cudnn_forward,
    }
    if heads != kv_heads:  # staged: the q heads of a KV head folded into the merging kernel's rows
        packed = Sm90ForwardPass(q, k, scale, pack_gqa=True)
        contenders["fa4_cp_fwd_merge_packed_q_heads"] = lambda: packed.step(q, k, v, out, lse, mask=mask, accumulate=True)
    if dim != dim_v:
        del contenders["fa4_cp_fwd_merge_kernel"]  # the stand-alone merge is not built for v narrower than k
    if not _runs(cudnn_forward):
        del contenders["cudnn_sdpa_fwd"]
    forward = median_ms(contenders, queued=queued)
    if forward_only:
        return forward_row(seq, heads, kv_heads, dim, dim_v, causal, forward, kernel_breakdown(forward_contenders) if breakdown else None)

    up_out, up_lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    dk_acc, dv_acc = (torch.zeros(t.shape, device="cuda", dtype=torch.float32) for t in (k, v))

    def backward_pass():
        return fused.backward(q, up_out, up_lse, dout, None, softmax_scale=scale)

    dk16, dv16 = torch.empty_like(k), torch.empty_like(v)
    pair = torch.zeros((2, *k.shape[:-1], max(dim, dim_v)), device="cuda", dtype=torch.float32)  # the ring's stacked dK/dV

    def ours_backward():
        """What a ring call's first step launches (runtime/travelling.py): its kernel writes the fp32
        dK/dV buffer first where the heads allow (one q head per kv head), else the buffer is zeroed
        and the kernel adds into it."""
        grads = backward_pass()
        first_write = grads.can_write_first(k)
        if not first_write:
            pair.zero_()
        grads.step(k, v, pair[0][..., :dim], pair[1][..., :dim_v], q_rows=slice(None), mask=mask, write_first=first_write)
        grads.dq()

    def ours_ring_of_one():
        """What a ring call of one rank launches (runtime/executor.py): the sole block writes
        finished 16-bit dK/dV where it can; else fp32 sums, zeroed first, then the finish."""
        grads = backward_pass()
        if grads.can_write_rounded(k):
            grads.step(k, v, dk16, dv16, q_rows=slice(None), mask=mask, write_rounded=True)
        else:
            pair.zero_()
            grads.step(k, v, pair[0][..., :dim], pair[1][..., :dim_v], q_rows=slice(None), mask=mask)
            grads.finish_dkv(None, [pair], k, v)
        grads.dq()

    steady = backward_pass()
    contenders = {
        "fa4_cp_bwd": ours_backward,
        "fa4_cp_bwd_ring_of_one": ours_ring_of_one,
        "fa4_cp_bwd_step": lambda: steady.step(k, v, dk_acc, dv_acc, q_rows=slice(None), mask=mask),
        "upstream_fa4_bwd": lambda: _flash_attn_bwd(q, k, v, up_out, dout, up_lse, softmax_scale=scale, causal=causal),
    }
    if "cudnn_sdpa_fwd" in forward:
        cudnn_out, cudnn_dout = cudnn_forward(), dout.transpose(1, 2)
        contenders["cudnn_sdpa_bwd"] = lambda: torch.autograd.grad(cudnn_out, (q_t, k_t, v_t), cudnn_dout, retain_graph=True)
    times = forward | median_ms(contenders, queued=queued)
    kernels_us = kernel_breakdown({**forward_contenders, **contenders}) if breakdown else None
    return forward_row(seq, heads, kv_heads, dim, dim_v, causal, times, kernels_us)


def forward_row(seq: int, heads: int, kv_heads: int, dim: int, dim_v: int, causal: bool, times: dict, kernels_us: dict | None) -> dict:
    """A config's row: times, TFLOPs and the ratios (None where a contender was not timed)."""
    flops = {name: 2 * seq * seq * heads * (dim + dim_v) / (2 if causal else 1) * (2.5 if "bwd" in name else 1) for name in times}

    def ratio(slower: str, ours_: str) -> float | None:
        return times[slower] / times[ours_] if slower in times and ours_ in times else None

    return {
        "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "head_dim_v": dim_v, "causal": causal,
        "ms": times,
        "tflops": {name: flops[name] / (ms * 1e-3) / 1e12 for name, ms in times.items()},
        "fwd_vs_upstream": ratio("upstream_fa4_fwd", "fa4_cp_fwd_merge"),
        "fwd_ring_of_one_vs_upstream": ratio("upstream_fa4_fwd", "fa4_cp_fwd_ring_of_one"),
        "fwd_packed_q_heads_vs_upstream": ratio("upstream_fa4_fwd", "fa4_cp_fwd_merge_packed_q_heads"),
        "fwd_vs_cudnn": ratio("cudnn_sdpa_fwd", "fa4_cp_fwd_merge"),
        "fused_vs_merge_kernel": ratio("fa4_cp_fwd_merge_kernel", "fa4_cp_fwd_merge"),
        "bwd_vs_upstream": ratio("upstream_fa4_bwd", "fa4_cp_bwd"),
        "bwd_ring_of_one_vs_upstream": ratio("upstream_fa4_bwd", "fa4_cp_bwd_ring_of_one"),
        "bwd_step_vs_upstream": ratio("upstream_fa4_bwd", "fa4_cp_bwd_step"),
        "bwd_vs_cudnn": ratio("cudnn_sdpa_bwd", "fa4_cp_bwd"),
        **({"kernels_us": kernels_us} if kernels_us is not None else {}),
    }


def kernel_breakdown(contenders: dict, calls: int = 3) -> dict:
    """Per contender, the GPU us per call of each kernel it launches (torch.profiler over `calls`
    calls after a warm-up), by kernel name (CuTe's long names cut to 120 characters), largest
    first: where a contender's time beside the attention kernel goes."""
    from gpu_work import kernel_events, profiled

    breakdown = {}
    for name, fn in contenders.items():
        per_kernel = collections.Counter()
        for event in kernel_events(profiled(lambda fn=fn: [fn() for _ in range(calls)])):
            per_kernel[event.name[:120]] += event.time_range.elapsed_us() / calls
        breakdown[name] = dict(per_kernel.most_common())
    return breakdown


def _runs(fn) -> bool:
    """Whether a contender takes the shape (cuDNN refuses some head dims)."""
    try:
        fn()
        return True
    except RuntimeError:
        return False


def first_call_seconds(cache_dir: str) -> float:
    env = dict(os.environ, FA4_CP_KERNEL_CACHE_DIR=cache_dir)
    code = FIRST_CALL.format(root=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="S = 8K and 32K only")
    parser.add_argument("--head-dims", nargs="+", default=["64", "128"], choices=DIMS, help="head_dim, or q/k / v head dims")
    parser.add_argument("--seqs", nargs="+", type=int, help="only these sequence lengths")
    parser.add_argument("--no-first-call", action="store_true", help="skip timing the first call's compile")
    parser.add_argument("--host-paced", action="store_true", help="time from an idle GPU (host path included), not queued GPU time")
    parser.add_argument("--breakdown", action="store_true", help="also each contender's kernels, GPU us per call by name (torch.profiler)")
    parser.add_argument("--forward-only", action="store_true", help="the forward contenders only (no backward rows)")
    args = parser.parse_args()
    timing = "from an idle GPU, host-paced" if args.host_paced else "each call queued behind a sleep kernel (GPU time)"
    result = record(
        "kernels", "cuda", dtype="bfloat16", batch=1, quick=args.quick, head_dims=args.head_dims,
        statistic=f"median of 15 interleaved rounds after 3 warm-up calls each, CUDA events, {timing}", host_paced=args.host_paced,
        fa4_cp_bwd="a ring call's first step: the fp32 dK/dV written first with one q head per kv head, else zeroed and added to",
        forward_only=args.forward_only, rows=[],
    )
    device = result["device"].lower().replace(" ", "_")
    path = os.path.join(args.out, f"kernels_{device}_{today()}{'_quick' if args.quick else ''}{'_host_paced' if args.host_paced else ''}{'_forward' if args.forward_only else ''}.json")
    rows = result["rows"]
    for config in GRID:
        if (not args.quick or config[0] <= 32768) and config[3] in args.head_dims and (not args.seqs or config[0] in args.seqs):
            rows.append(run_config(*config, queued=not args.host_paced, breakdown=args.breakdown, forward_only=args.forward_only))
            write(result, path)  # each row as it lands, so a run cut short keeps what it measured
    if not args.no_first_call:
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = first_call_seconds(cache_dir)
            warm = first_call_seconds(cache_dir)
        result["first_call_seconds"] = {"cold_cache": cold, "warm_cache": warm}
        write(result, path)
    print(f"{'S':>6} {'H':>6} {'d':>4} {'causal':>6} | fwd TFLOPs: {'ours':>5} {'kernel':>6} {'FA4':>5} {'cuDNN':>5} | bwd TFLOPs: {'ours':>5} {'step':>5} {'FA4':>5} {'cuDNN':>5} | ratios fwd/FA4 fwd/cuDNN bwd/FA4 bwd/cuDNN")
    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for row in rows:
        t = row["tflops"]
        dims = f"{row['head_dim']}" if row["head_dim"] == row["head_dim_v"] else f"{row['head_dim']}/{row['head_dim_v']}"
        print(
            f"{row['seq']:>6} {row['heads']:>3}:{row['kv_heads']:<2} {dims:>7} {str(row['causal']):>6} | {'':>11} "
            + " ".join(cell(t.get(name), 5, 0) for name in ("fa4_cp_fwd_merge", "fa4_cp_fwd_merge_kernel", "upstream_fa4_fwd", "cudnn_sdpa_fwd"))
            + f" | {'':>11} "
            + " ".join(cell(t.get(name), 5, 0) for name in ("fa4_cp_bwd", "fa4_cp_bwd_step", "upstream_fa4_bwd", "cudnn_sdpa_bwd"))
            + " | " + " ".join(cell(row[name], 9, 3) for name in ("fwd_vs_upstream", "fwd_vs_cudnn", "bwd_vs_upstream", "bwd_vs_cudnn"))
        )
    for row in rows if args.breakdown else ():
        for name in ("fa4_cp_fwd_merge", "upstream_fa4_fwd", "fa4_cp_bwd", "upstream_fa4_bwd"):
            if name not in row["ms"]:
                continue
            kernels = row["kernels_us"].get(name, {})
            print(f"{row['seq']} {row['heads']}:{row['kv_heads']} d {row['head_dim']} causal {row['causal']} {name}: {sum(kernels.values()):.0f} us = "
                  + ", ".join(f"{us:.0f} {kernel[:48]}" for kernel, us in kernels.items()))
    if "first_call_seconds" in result:
        cold, warm = result["first_call_seconds"].values()
        print(f"first call of a new configuration: {cold:.1f} s with a cold compile cache, {warm:.1f} s warm")


if __name__ == "__main__":
    main()
