"""Packed documents at MagiAttention's operating point, replayed on one GPU: compute only (no
transfers, no all-to-alls; the JSON says so), with the Ulysses x ring split that plan_mesh picks
for each batch, against MagiAttention's published figures and upstream FA4 on one device.

    python bench/magi_replay.py [--world-sizes 8 16 32 64] [--mixes pretrain finetune] [--out PATH]
    python bench/magi_replay.py --dry-run     # CPU, reference backend, tiny sizes: every code path

MagiAttention's metric: varlen-causal TFLOPs/s per GPU at 64:8 heads, head_dim 128, 8K tokens per
GPU: the documents' causal FLOPs (forward 4 h d L(L+1)/2 per document, backward 2.5x) / W over the
slowest rank's time, forward and backward apart. A rank of a u x r split runs the ring of r ring
ranks on h/u heads (KV heads repeated to u where fewer) over its ring rank's rows (u x 8K tokens),
so each ring rank is replayed alone (bench/replay.py, all its kernels) and stands for its u
ulysses ranks. Balance: each ring rank's measured time against the calibrated kernel model's
(plan/placement.rank_costs_ms over the balanced placement): measured and modelled imbalance
(slowest / mean), and per rank measured / modelled; and of each rank's fwd + bwd ("imbalance").
The plain ring (u = 1) is replayed as well when plan_mesh picks another split, and the splits
`--also-ulysses` names (bench/ring_model.py --replay-magi adds their transfers); `--head-chunks`
replays the 2-D ones cut into head chunks (runtime/ulysses.py), one chunk's ring taken C times. Mixes: bench/mixes.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_forward_option_arguments, apply_forward_options, document_sharding, record, write  # noqa: E402
from mixes import add_mix_arguments, batches  # noqa: E402
from replay import replay_rank  # noqa: E402

import fa4_cp  # noqa: E402
from fa4_cp import plan_mesh  # noqa: E402
from fa4_cp.kernels import BandMask, get_backend  # noqa: E402
from fa4_cp.plan.head_chunks import HeadChunks  # noqa: E402
from fa4_cp.plan.placement import rank_costs_ms  # noqa: E402
from fa4_cp.validation import heads_split  # noqa: E402

CAUSAL = BandMask(hi=0)
MAGI_H100_TFLOPS = {  # MagiAttention's published varlen-causal figures per GPU (H100, 64:8, d 128, 8K per GPU)
    "forward": {8: 459, 16: 426, 32: 315, 64: 237},
    "backward": {8: 360, 16: 371, 32: 333, 64: 264},
}
DIRECTIONS = ("forward", "backward")


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> dict[str, float]:
    forward = sum(4 * heads * head_dim * n * (n + 1) / 2 for n in lengths)
    return {"forward": forward, "backward": 2.5 * forward}


def replay_split(lengths: list[int], world: int, ulysses: int, shape: dict, backend, device: torch.device, chunks: int = 1) -> dict:
    """Every ring rank of a ulysses x (world / ulysses) split, replayed alone, with the model's cost
    beside. With head `chunks`, one chunk's ring is replayed (h / (u chunks) heads, its KV heads),
    its times taken `chunks` times: a rank runs its chunks' rings one after another."""
    ring = world // ulysses
    heads, kv_heads = shape["heads"] // ulysses, max(shape["kv_heads"] // ulysses, 1)
    sharding = document_sharding(fa4_cp, lengths, ring, ulysses)  # also in a baseline tree from before the split's pricing
    chunk = HeadChunks.of(heads, kv_heads, chunks)
    ranks = [
        _times(replay_rank(sharding, CAUSAL, rank, chunk.q_heads, chunk.kv_heads, shape["head_dim"], backend, device=device), chunks)
        for rank in range(ring)
    ]
    modelled = rank_costs_ms(sharding, heads, shape["head_dim"])
    flops = causal_flops(lengths, shape["heads"], shape["head_dim"])
    result = {
        "ulysses": ulysses, "ring": ring, "heads_per_rank": heads, "kv_heads_per_rank": kv_heads, "ring_rank_tokens": sharding.local_len,
        "head_chunks": chunks,
    }
    for index, direction in enumerate(DIRECTIONS):
        measured = [rank[f"{direction}_ms"] for rank in ranks]
        model = [cost[index] for cost in modelled]
        slowest = max(measured)
        result[direction] = {
            "slowest_ms": slowest,
            "attention_slowest_ms": max(rank[f"{direction}_attention_ms"] for rank in ranks),
            "imbalance": slowest / statistics.mean(measured),
            "modelled_imbalance": max(model) / statistics.mean(model) if any(model) else 1.0,
            "measured_over_modelled": [m / c if c else None for m, c in zip(measured, model)],
            "tflops_per_gpu": flops[direction] / world / (slowest * 1e-3) / 1e12,
            # the same from an idle GPU, the host pacing the launches (bench/replay.py)
            "tflops_per_gpu_paced": flops[direction] / world / (max(rank[f"{direction}_paced_ms"] for rank in ranks) * 1e-3) / 1e12,
            # what plan_mesh's per-step overhead stands for: a rank's time beside its attention kernels, per active step
            "other_ms_per_step": statistics.mean(
                (rank[f"{direction}_ms"] - rank[f"{direction}_attention_ms"]) / max(len(rank["steps"]), 1) for rank in ranks
            ),
        }
        if world in MAGI_H100_TFLOPS[direction]:
            result[direction]["over_magi_h100"] = result[direction]["tflops_per_gpu"] / MAGI_H100_TFLOPS[direction][world]
    measured, loads = [rank["forward_ms"] + rank["backward_ms"] for rank in ranks], [sum(cost) for cost in modelled]
    result["imbalance"] = {"measured": max(measured) / statistics.mean(measured), "modelled": max(loads) / statistics.mean(loads)}
    result["ranks"] = [{**rank, "modelled_ms": [float(c) for c in cost]} for rank, cost in zip(ranks, modelled)]
    return result


def _times(rank: dict, chunks: int) -> dict:
    """A replayed rank's times (every *_ms, per step too) taken `chunks` times."""
    if chunks == 1:
        return rank
    scaled = {}
    for key, value in rank.items():
        if key.endswith("_ms") and isinstance(value, float):
            value = value * chunks
        elif key.endswith("_ms") and isinstance(value, list):
            value = [x * chunks for x in value]
        scaled[key] = value
    return scaled


def upstream_one_device_ms(lengths: list[int], shape: dict) -> dict[str, float]:
    """Upstream FA4 varlen over every document on this one device: forward and backward ms."""
    from common import median_ms
    from flash_attn.cute import flash_attn_varlen_func

    total, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(total, shape["heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, shape["kv_heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    def forward():
        result = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True)
        return result[0] if isinstance(result, tuple) else result

    out = forward()
    dout = torch.randn_like(out)
    times = median_ms({"forward": forward, "backward": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)}, warmup=1, iters=3, queued=True)
    return {"forward": times["forward"], "backward": times["backward"]}


def run_config(
    mix: str, world: int, lengths: list[int], shape: dict, backend, device: torch.device, also_ulysses: tuple[int, ...] = (),
    head_chunks: tuple[int, ...] = (),
) -> dict:
    plan = plan_mesh(world, shape["heads"], shape["kv_heads"], sum(lengths), head_dim=shape["head_dim"], documents=lengths)
    row = {
        "mix": mix, "world_size": world, "documents": len(lengths), "median_length": statistics.median(lengths), "longest": max(lengths),
        "causal_flops": causal_flops(lengths, shape["heads"], shape["head_dim"]), "plan_mesh": {"ulysses": plan.ulysses, "ring": plan.ring, "reason": plan.reason},
        "chosen": replay_split(lengths, world, plan.ulysses, shape, backend, device),
    }
    if plan.ulysses != 1:
        row["plain_ring"] = replay_split(lengths, world, 1, shape, backend, device)
    # the splits plan_mesh did not pick, where asked for: what bench/ring_model.py sets the choice against
    others = [u for u in also_ulysses if u not in (1, plan.ulysses) and world % u == 0 and heads_split(shape["heads"], shape["kv_heads"], u)]
    for u in others:
        row[f"ulysses_{u}"] = replay_split(lengths, world, u, shape, backend, device)
    # the 2-D splits again in head chunks, where asked for and the heads allow: what the chunks cost the compute
    chunked = []
    for split in ("chosen", *(f"ulysses_{u}" for u in others)):
        u = row[split]["ulysses"]
        for chunks in head_chunks if u > 1 else ():
            try:
                HeadChunks.of(shape["heads"] // u, max(shape["kv_heads"] // u, 1), chunks)
            except ValueError:
                continue
            chunked.append(f"{split}_chunks_{chunks}")
            row[chunked[-1]] = replay_split(lengths, world, u, shape, backend, device, chunks)
    if device.type == "cuda":
        one_device = upstream_one_device_ms(lengths, shape)
        row["upstream_one_device_ms"] = one_device
        for split in ("chosen", "plain_ring", *(f"ulysses_{u}" for u in others), *chunked):
            for direction in DIRECTIONS if split in row else ():
                row[split][direction]["efficiency_vs_one_device"] = one_device[direction] / (world * row[split][direction]["slowest_ms"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mix_arguments(parser, [8, 16, 32, 64])
    parser.add_argument("--dry-run", action="store_true", help="CPU, reference backend, 8:2 heads of 16, 64 tokens per GPU")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no configuration after this")
    parser.add_argument(
        "--also-ulysses", type=int, nargs="*", default=[], help="replay these Ulysses sizes too where they divide W and the heads ('ulysses_U')",
    )
    parser.add_argument(
        "--head-chunks", type=int, nargs="*", default=[], help="replay the 2-D splits in these head chunks too ('<split>_chunks_C')",
    )
    add_forward_option_arguments(parser)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    began = time.monotonic()
    options = apply_forward_options(args)
    if args.dry_run:
        device, shape = torch.device("cpu"), {"heads": 8, "kv_heads": 2, "head_dim": 16, "tokens_per_gpu": 64}
        backend = get_backend("reference")
    else:
        device, shape = torch.device("cuda"), {"heads": 64, "kv_heads": 8, "head_dim": 128, "tokens_per_gpu": 8192}
        backend = get_backend("fa4", torch.empty(1, 1, 1, shape["head_dim"], device=device, dtype=torch.bfloat16))
    result = record(
        "magi_replay", device.type, **shape, causal=True, dtype="bfloat16",
        method="compute-only replay on one GPU: each ring rank alone with the real kernels (all of them), no transfers and no "
        "all-to-alls; CUDA events, median of 3 after one warm-up, the launches queued behind a sleep kernel (GPU time; "
        "*_paced: from an idle GPU, as the host launches); MagiAttention's figures are its published H100 numbers",
        magi_h100_tflops=MAGI_H100_TFLOPS, **options, rows=[],
    )
    for mix, world, lengths in batches(args.mixes, args.world_sizes, shape["tokens_per_gpu"]):
        if args.max_minutes is not None and time.monotonic() - began > 60 * args.max_minutes:
            result["stopped_early"] = True
            break
        row = run_config(mix, world, lengths, shape, backend, device, tuple(args.also_ulysses), tuple(args.head_chunks))
        result["rows"].append(row)
        write(result, args.out)
        chosen = row["chosen"]
        print(
            f"{mix:8} W={world:<3} {chosen['ulysses']} x {chosen['ring']}: fwd {chosen['forward']['tflops_per_gpu']:6.1f} TF/s "
            f"bwd {chosen['backward']['tflops_per_gpu']:6.1f} TF/s, imbalance bwd {chosen['backward']['imbalance']:.3f} "
            f"(model {chosen['backward']['modelled_imbalance']:.3f}); fwd+bwd {chosen['imbalance']['measured']:.3f} "
            f"(model {chosen['imbalance']['modelled']:.3f})", flush=True,
        )


if __name__ == "__main__":
    main()
