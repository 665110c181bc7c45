"""Packed documents on a ring, replayed on one GPU: every rank's kernel work with the real FA4
backend, for the balanced layout, the per-document zigzag and upstream FA4 varlen on one device.

    python bench/varlen.py [--world-sizes 8 16 32 64] [--heads 64:8 32:8] [--mixes python lognormal]
                           [--dense] [--out PATH] [--max-minutes M]

Per configuration (W, heads, document mix; 8K tokens per GPU, head_dim 128, causal, bf16):
- each rank replayed alone (bench/replay.py): forward and backward time of all its kernels, its
  attention kernels per ring step, and its hop's bytes; the slowest rank and imbalance (max /
  mean of all-kernel time); the padding fraction;
- TFLOPs/s per GPU in MagiAttention's metric: the document mask's FLOPs (forward 4 H d L(L+1)/2 per
  document, backward 2.5x that) / W, over the slowest rank's time, forward and backward apart;
- compute efficiency: upstream FA4 varlen on one device over the same documents / (W x slowest).
Mixes: "python", consecutive files of the installed Python sources (launch/data.py's corpus,
each file a document), from a seeded offset; "lognormal", lengths log-normal with median 1K, cut
to 1..64K (pretraining-like). `--dense` adds dense causal zigzag replays at W = 2 and 4 (8K, 32K,
128K per GPU; heads 32 and 32:8) for bench/ring_model.py's validation.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from common import RESULTS, record, today, write  # noqa: E402
from data import corpus_file_lengths  # noqa: E402
from fa4_cp import Sharding  # noqa: E402
from fa4_cp.kernels import BandMask, get_backend  # noqa: E402
from replay import replay_rank  # noqa: E402

HEAD_DIM = 128
TOKENS_PER_GPU = 8192
CAUSAL = BandMask(hi=0)


def lognormal_lengths(total: int, seed: int) -> list[int]:
    generator, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(max(1, min(65536, int(generator.lognormvariate(math.log(1000), 1.3)))))
    lengths[-1] -= sum(lengths) - total
    return lengths


def python_lengths(total: int, seed: int, files: list[int]) -> list[int]:
    """The files from a seeded offset until `total` tokens, the last one cut, as packing does."""
    start = random.Random(seed).randrange(len(files))
    lengths = []
    while sum(lengths) < total:
        lengths.append(files[(start + len(lengths)) % len(files)])
    lengths[-1] -= sum(lengths) - total
    return lengths


def mask_flops(lengths: list[int], heads: int) -> tuple[float, float]:
    forward = sum(4 * heads * HEAD_DIM * length * (length + 1) / 2 for length in lengths)
    return forward, 2.5 * forward


def upstream_ms(lengths: list[int], heads: int, kv_heads: int, iters: int = 3) -> tuple[float, float]:
    """Upstream FA4 varlen over every document on this one device: forward and backward ms."""
    from flash_attn.cute import flash_attn_varlen_func

    total = sum(lengths)
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(total, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    longest = max(lengths)

    def forward():
        result = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True)
        return result[0] if isinstance(result, tuple) else result

    out = forward()
    dout = torch.randn_like(out)
    out.backward(dout)
    times = {"forward": [], "backward": []}
    for _ in range(iters):
        for name in ("forward", "backward"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if name == "forward":
                start.record()
                out = forward()
                end.record()
            else:
                start.record()
                out.backward(dout)
                end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return statistics.median(times["forward"]), statistics.median(times["backward"])


def run_layout(sharding, heads: int, kv_heads: int, backend) -> dict:
    ranks = [replay_rank(sharding, CAUSAL, rank, heads, kv_heads, HEAD_DIM, backend) for rank in range(sharding.world_size)]
    summary = {}
    for direction in ("forward", "backward"):
        times = [r[f"{direction}_ms"] for r in ranks]
        summary[direction] = {
            "slowest_ms": max(times), "mean_ms": statistics.mean(times), "imbalance": max(times) / statistics.mean(times),
            "attention_slowest_ms": max(r[f"{direction}_attention_ms"] for r in ranks),
        }
    summary["padding_fraction"] = 1 - sharding.total_len / (sharding.world_size * sharding.local_len) if sharding.varlen else 0.0
    summary["kv_hop_bytes"] = ranks[0]["kv_hop_bytes"]
    summary["dkv_hop_bytes"] = ranks[0]["dkv_hop_bytes"]
    summary["active_steps"] = len(ranks[0]["steps"])
    summary["ranks"] = ranks
    return summary


def packed_config(world_size: int, heads: tuple[int, int], mix: str, files: list[int], backend) -> dict:
    total = TOKENS_PER_GPU * world_size
    lengths = lognormal_lengths(total, seed=world_size) if mix == "lognormal" else python_lengths(total, world_size, files)
    flops = mask_flops(lengths, heads[0])
    row = {
        "world_size": world_size, "heads": heads[0], "kv_heads": heads[1], "mix": mix, "tokens_per_gpu": TOKENS_PER_GPU,
        "documents": len(lengths), "median_length": statistics.median(lengths), "longest": max(lengths),
        "mask_flops": {"forward": flops[0], "backward": flops[1]},
    }
    up_forward, up_backward = upstream_ms(lengths, *heads)
    row["upstream_one_device_ms"] = {"forward": up_forward, "backward": up_backward}
    for layout in ("balanced", "zigzag"):
        sharding = Sharding.documents(lengths, world_size, layout)
        result = run_layout(sharding, *heads, backend)
        for index, direction in enumerate(("forward", "backward")):
            slowest = result[direction]["slowest_ms"]
            result[direction]["tflops_per_gpu"] = flops[index] / world_size / (slowest * 1e-3) / 1e12
            up = up_forward if direction == "forward" else up_backward
            result[direction]["efficiency_vs_one_device"] = up / (world_size * slowest)
        if layout == "balanced":
            result["spans"] = {str(g): sum(1 for _, ranks in sharding.spans if ranks == g) for g in sorted({r for _, r in sharding.spans})}
        row[layout] = result
    return row


def dense_config(world_size: int, heads: tuple[int, int], seq_per_gpu: int, backend) -> dict:
    sharding = Sharding.dense(seq_per_gpu * world_size, world_size, "zigzag")
    return {"world_size": world_size, "heads": heads[0], "kv_heads": heads[1], "seq_per_gpu": seq_per_gpu, "zigzag": run_layout(sharding, *heads, backend)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--heads", nargs="+", default=["64:8", "32:8"])
    parser.add_argument("--mixes", nargs="+", choices=["python", "lognormal"], default=["python", "lognormal"])
    parser.add_argument("--dense", action="store_true", help="also the dense W = 2, 4 replays for the ring model")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting configurations after this")
    parser.add_argument("--out")
    args = parser.parse_args()
    began = time.monotonic()
    heads = [tuple(int(n) for n in pair.split(":")) for pair in args.heads]
    backend = get_backend("fa4", torch.empty(1, 1, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16))
    files = corpus_file_lengths()
    result = record(
        "varlen", "cuda", head_dim=HEAD_DIM, causal=True, dtype="bfloat16", tokens_per_gpu=TOKENS_PER_GPU,
        corpus_files=len(files), statistic="median of 3 after 1 warm-up, CUDA events; per rank replayed alone, its launches queued behind a sleep kernel (GPU time)",
        packed=[], dense=[],
    )
    out = args.out or RESULTS / f"varlen_{result['device'].lower().replace(' ', '_')}_{today()}.json"

    def out_of_time() -> bool:
        return args.max_minutes is not None and time.monotonic() - began > 60 * args.max_minutes

    if args.dense:
        for world_size in (2, 4):
            for pair in ((32, 32), (32, 8)):
                for seq in (8192, 32768, 131072):
                    result["dense"].append(dense_config(world_size, pair, seq, backend))
                    write(result, out)
    for pair in heads:
        for mix in args.mixes:
            for world_size in args.world_sizes:
                if out_of_time():
                    result["stopped_early"] = True
                    break
                row = packed_config(world_size, pair, mix, files, backend)
                result["packed"].append(row)
                write(result, out)
                b, z = row["balanced"], row["zigzag"]
                print(
                    f"{mix:9} W={world_size:<3} {pair[0]}:{pair[1]:<2} docs {row['documents']:4} | balanced fwd "
                    f"{b['forward']['tflops_per_gpu']:5.0f} TF/s eff {b['forward']['efficiency_vs_one_device']:.2f} bwd "
                    f"{b['backward']['tflops_per_gpu']:5.0f} eff {b['backward']['efficiency_vs_one_device']:.2f} imb "
                    f"{b['backward']['imbalance']:.3f} pad {b['padding_fraction']:.3f} | zigzag bwd {z['backward']['tflops_per_gpu']:5.0f} "
                    f"eff {z['backward']['efficiency_vs_one_device']:.2f}", flush=True,
                )


if __name__ == "__main__":
    main()
