"""Kernel benchmark on one GPU: fa4_cp's forward with LSE partials against upstream FA4 and cuDNN SDPA.

    python bench/kernels.py            (the full grid; about two minutes on an H200)

Forward only for now (the backward joins with the FA4 backward). TFLOPs count 4·S²·H·d, halved
when causal. Times are CUDA-event medians after warm-up. Also measures the first call of a new
configuration with a cold and a warm on-disk compile cache, each in a fresh process. Writes
bench/results/kernels_<gpu>_<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fa4_cp.kernels import LSE_ACCUMULATOR_DTYPE, BandMask  # noqa: E402
from fa4_cp.kernels.fa4.forward import forward_partials_sm90  # noqa: E402

GRID = [
    (seq, heads, kv_heads, dim, causal)
    for seq in (8192, 32768, 65536)
    for heads, kv_heads in ((32, 32), (32, 8))
    for dim in (64, 128)
    for causal in (True, False)
]

FIRST_CALL = """
import time, torch, sys
sys.path.insert(0, {root!r})
from fa4_cp.kernels import BandMask
from fa4_cp.kernels.fa4.forward import forward_partials_sm90
q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
out = torch.zeros(q.shape, device="cuda"); lse = torch.full((1, 16, 4096), -float("inf"), device="cuda", dtype=torch.float64)
torch.cuda.synchronize(); start = time.perf_counter()
forward_partials_sm90(q, k, v, out, lse, mask=BandMask(hi=0), softmax_scale=0.1, accumulate=True, varlen=None)
torch.cuda.synchronize(); print(time.perf_counter() - start)
"""


def median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_config(seq: int, heads: int, kv_heads: int, dim: int, causal: bool) -> dict:
    from flash_attn.cute import flash_attn_func

    q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    lse = torch.full((1, heads, seq), -math.inf, device="cuda", dtype=LSE_ACCUMULATOR_DTYPE)
    mask = BandMask(hi=0) if causal else BandMask()
    scale = dim**-0.5

    def ours(accumulate: bool):
        return lambda: forward_partials_sm90(q, k, v, out, lse, mask=mask, softmax_scale=scale, accumulate=accumulate, varlen=None)

    q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))

    def cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal, enable_gqa=kv_heads != heads)

    times = {
        "fa4_cp_fwd_merge": median_ms(ours(True)),
        "fa4_cp_fwd_first": median_ms(ours(False)),
        "upstream_fa4_fwd": median_ms(lambda: flash_attn_func(q, k, v, causal=causal)),
        "cudnn_sdpa_fwd": median_ms(cudnn),
    }
    flops = 4 * seq * seq * heads * dim / (2 if causal else 1)
    return {
        "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "causal": causal,
        "ms": times,
        "tflops": {name: flops / (ms * 1e-3) / 1e12 for name, ms in times.items()},
        "merge_vs_upstream": times["upstream_fa4_fwd"] / times["fa4_cp_fwd_merge"],
        "merge_vs_cudnn": times["cudnn_sdpa_fwd"] / times["fa4_cp_fwd_merge"],
    }


def first_call_seconds(cache_dir: str) -> float:
    env = dict(os.environ, FA4_CP_KERNEL_CACHE_DIR=cache_dir)
    code = FIRST_CALL.format(root=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rows = [run_config(*config) for config in GRID]
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_call_seconds(cache_dir)
        warm = first_call_seconds(cache_dir)
    device = torch.cuda.get_device_name(0)
    record = {
        "benchmark": "kernels_forward",
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "batch": 1,
        "statistic": "median of 10 after 3 warm-up, CUDA events",
        "first_call_seconds": {"cold_cache": cold, "warm_cache": warm},
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_{device.lower().replace(' ', '_')}_{record['date']}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{'S':>6} {'H':>6} {'d':>4} {'causal':>6} | {'ours merge':>10} {'ours 1st':>9} {'upstream':>9} {'cuDNN':>7} | {'vs FA4':>6} {'vs cuDNN':>8}  (TFLOPs)")
    for row in rows:
        t = row["tflops"]
        print(
            f"{row['seq']:>6} {row['heads']:>3}:{row['kv_heads']:<2} {row['head_dim']:>4} {str(row['causal']):>6} | "
            f"{t['fa4_cp_fwd_merge']:>10.0f} {t['fa4_cp_fwd_first']:>9.0f} {t['upstream_fa4_fwd']:>9.0f} {t['cudnn_sdpa_fwd']:>7.0f} | "
            f"{row['merge_vs_upstream']:>6.3f} {row['merge_vs_cudnn']:>8.3f}"
        )
    print(f"first call of a new configuration: {cold:.1f} s with a cold compile cache, {warm:.1f} s warm")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
