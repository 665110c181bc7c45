"""Tokens/s of a compiled Llama block whose attention is fa4_cp's ring: traced whole (the custom
op, no graph break) against the same block with the ring behind torch.compiler.disable (how
fa4_cp ran under torch.compile before), and eager. One rank (a ring of one), CUDA events after
warm-up, median of the timed steps; forward + backward.

    python bench/compile_block.py --out bench/results/<device>_<date>/compile_block.json
    python bench/compile_block.py --device cpu --backend reference --dim 256 --seq 512 --compile-backend aot_eager  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fa4_cp
from common import record, write


class LlamaBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, backend: str | None, hidden_ring: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.backend = heads, kv_heads, dim // heads, backend
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.up = torch.nn.Linear(dim, 2 * 4 * dim, bias=False)
        self.down = torch.nn.Linear(4 * dim, dim, bias=False)
        self.attention = torch.compiler.disable(self._ring) if hidden_ring else self._ring

    def _ring(self, q, k, v):
        return fa4_cp.ring_attention(q, k, v, causal=True, backend=self.backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.head_dim, *[self.kv_heads * self.head_dim] * 2], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        x = x + self.out(self.attention(q, k, v).flatten(-2))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def time_steps(block, inputs, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds of one forward + backward."""
    x, cos, sin = inputs
    for _ in range(warmup):
        block(x, cos, sin).sum().backward()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            block(x, cos, sin).sum().backward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            block(x, cos, sin).sum().backward()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="auto", help="fa4_cp backend (default: %(default)s)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(1, args.seq, args.dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.arange(args.seq, device=device)[:, None, None] * torch.logspace(0, -4, args.dim // args.heads // 2, device=device)
    inputs = (x, angles.cos().to(dtype), angles.sin().to(dtype))
    seconds = {}
    for name, hidden, compiled in (("eager", False, False), ("compiled, ring hidden", True, True), ("compiled, ring traced", False, True)):
        torch._dynamo.reset()
        block = LlamaBlock(args.dim, args.heads, args.kv_heads, args.backend, hidden).to(device, dtype)
        runner = torch.compile(block, backend=args.compile_backend) if compiled else block
        graph_breaks = torch._dynamo.explain(block)(*inputs).graph_break_count if compiled else None
        seconds[name] = (time_steps(runner, inputs, args.warmup, args.steps, device), graph_breaks)
    traced = seconds["compiled, ring traced"][0]
    rows = {
        name: {"median_step_s": s, "tokens_per_s": args.seq / s, "graph_breaks": breaks, "traced_speedup": s / traced}
        for name, (s, breaks) in seconds.items()
    }
    for name, row in rows.items():
        print(f"{name:24s} {row['tokens_per_s']:12.0f} tokens/s  graph breaks {row['graph_breaks']}  traced is {row['traced_speedup']:.3f}x")
    if args.out:
        write(record("compile_block", device, config=vars(args), results=rows), args.out)


if __name__ == "__main__":
    main()
