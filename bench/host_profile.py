"""Where the ring's host path goes: cProfile of ring_attention fwd+bwd calls on a 1-rank group
with the FA4 backend, the GPU kept busy so that no launch waits for it.

    python bench/host_profile.py --out host_profile.txt [--seq 8192] [--heads 32:8] [--calls 50]

Writes the profile sorted by own time and by cumulative time (text, for reading, not quoting).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import fa4_cp

GPU_BUSY_CYCLES = 400_000_000  # ~0.2 s of GPU time per call batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", default="32:8")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    heads, kv_heads = (int(n) for n in args.heads.split(":"))
    q = torch.randn(1, args.seq, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, args.seq, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def call() -> None:
        torch.autograd.backward(fa4_cp.ring_attention(q, k, v, causal=True, backend="fa4"), dout)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    for _ in range(args.calls):
        torch.cuda._sleep(GPU_BUSY_CYCLES)
        profiler.enable()
        call()
        profiler.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(60)
    with open(args.out, "w") as file:
        file.write(f"{args.calls} calls of ring_attention fwd+bwd, S={args.seq}, heads {args.heads}, d 128, bf16, causal\n")
        file.write(text.getvalue())
    print(text.getvalue()[:6000])


if __name__ == "__main__":
    main()
