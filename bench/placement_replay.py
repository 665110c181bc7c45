"""Every placement the balanced layout chooses from, replayed on one GPU: does the kernel model
pick the placement that runs fastest, and what does each cost in all?

    python bench/placement_replay.py [--cases pretrain_mesh_8x8 ...] [--out PATH]
    python bench/placement_replay.py --dry-run     # CPU, reference backend, tiny sizes: every code path
    python bench/placement_replay.py --plans-only  # CPU: each candidate's plans and model, nothing timed

For one batch of packed documents, `placement.placement_candidates` gives the greedy's placements
(the same spans are replayed once) and `balanced_sharding` keeps the one whose modelled slowest
rank is least. Each candidate's ring ranks are replayed alone (bench/replay.py: the real kernels,
no transfers) on the heads a ring rank holds (h / u of a u x r split). Per candidate: the measured
slowest rank (what a training step waits for) and the sum over ring ranks times u (the GPU work
that bench/gpu_work.py sums, less its transport and all-to-all copies), forward and backward, each
against the model at those heads (`rank_costs_ms`), which candidate the layout chose, and what its plans
launch (tile pairs, q and KV tiles, blocks, over the ring's ranks). The cases are
bench/gpu_work.py's packed ones (32:8 heads, d 128, its batches). Beside them, where a trade
changes it, the layout's placement itself: the chosen candidate with its kept documents traded
(plan/kept_trades.py), so that each batch measures what the trades buy; and the layout's host time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_forward_option_arguments, apply_forward_options, record, write  # noqa: E402
from fit_replay_costs import block_counts  # noqa: E402
from mixes import lognormal_lengths  # noqa: E402
from replay import replay_rank  # noqa: E402

from fa4_cp.kernels import BandMask, get_backend  # noqa: E402
from fa4_cp.plan.placement import balanced_sharding, modelled_ms, placement_candidates, placement_heads, rank_costs_ms  # noqa: E402
from fa4_cp.plan.rows import rank_plan  # noqa: E402

CAUSAL = BandMask(hi=0)
# gpu_work.py's packed cases: (mix, tokens, W, ulysses); its batches are lognormal_lengths(tokens, mix), seed 0
CASES = {
    "pretrain_w8": ("pretrain", 131072, 8, 1),
    "finetune_w16": ("finetune", 131072, 16, 1),
    "pretrain_mesh_8x8": ("pretrain", 524288, 64, 8),
    "finetune_mesh_8x8": ("finetune", 524288, 64, 8),
}
DIRECTIONS = ("forward", "backward")


def plan_counts(sharding) -> dict[str, int]:
    """What the ring ranks' plans launch, summed over the ring: tile pairs, q and KV tiles, sequences computed and listed, blocks."""
    totals = {"pairs": 0, "q_tiles": 0, "kv_tiles": 0, "sequences": 0, "listed": 0, "blocks": 0}
    for rank in range(sharding.world_size):
        for step in rank_plan(sharding, CAUSAL, rank, torch.device("cpu")).steps:
            for block in step.blocks:
                totals["blocks"] += 1
                for name, value in block_counts(block).items():
                    totals[name] += value
    return totals


def describe(sharding, heads: int, head_dim: int, ulysses: int) -> dict:
    """A placement's shape, plans and modelled (forward, backward) per ring rank at these heads."""
    modelled = rank_costs_ms(sharding, heads, head_dim)
    return {
        "widest_span": max(ranks for _, ranks in sharding.spans),
        "spread_documents": sum(1 for _, ranks in sharding.spans if ranks > 1),
        "plans": plan_counts(sharding),
        "modelled": {
            "per_rank_ms": [list(cost) for cost in modelled],
            "slowest_ms": max(sum(cost) for cost in modelled),
            "sum_ms": ulysses * sum(sum(cost) for cost in modelled),  # every ulysses rank of a ring rank runs its plan
        },
    }


def replay(sharding, heads: int, kv_heads: int, head_dim: int, ulysses: int, backend, device: torch.device) -> dict:
    """Measured forward and backward of every ring rank of one placement."""
    ranks = [replay_rank(sharding, CAUSAL, rank, heads, kv_heads, head_dim, backend, device=device) for rank in range(sharding.world_size)]
    result = {"ring_steps": [len(rank["steps"]) for rank in ranks]}
    for direction in DIRECTIONS:
        measured = [rank[f"{direction}_ms"] for rank in ranks]
        result[direction] = {
            "slowest_ms": max(measured),
            "sum_ms": ulysses * sum(measured),
            "attention_sum_ms": ulysses * sum(rank[f"{direction}_attention_ms"] for rank in ranks),
            "imbalance": max(measured) / statistics.mean(measured),
            "per_rank_ms": measured,
        }
    both = [f + b for f, b in zip(result["forward"]["per_rank_ms"], result["backward"]["per_rank_ms"])]
    result["both"] = {"slowest_ms": max(both), "sum_ms": ulysses * sum(both)}
    return result


def run_case(name: str, lengths: list[int], world: int, ulysses: int, shape: dict, backend, device: torch.device | None) -> dict:
    """Every distinct candidate of the batch, described and (unless `device` is None) replayed."""
    ring = world // ulysses
    heads, kv_heads = shape["heads"] // ulysses, max(shape["kv_heads"] // ulysses, 1)
    priced = placement_heads(ulysses)
    began = time.perf_counter()
    chosen = balanced_sharding(tuple(lengths), ring, priced)
    placement_seconds = time.perf_counter() - began  # the layout's host time for the batch, trades included (a fresh batch: no cache)
    scored = placement_candidates(tuple(lengths), ring, priced)
    picked = min(scored, key=lambda pair: pair[0])[1]  # the candidate whose kept documents the layout then trades
    candidates, seen = [], set()
    for objective, sharding in scored:
        if sharding.spans in seen:
            continue
        seen.add(sharding.spans)
        # objective_ms: the layout's own score of the placement (placement.modelled_ms at placement_heads(ulysses) of 128)
        candidate = {"objective_ms": objective, "chosen": sharding.spans == picked.spans, **describe(sharding, heads, shape["head_dim"], ulysses)}
        if device is not None:
            candidate["measured"] = replay(sharding, heads, kv_heads, shape["head_dim"], ulysses, backend, device)
        candidates.append(candidate)
    variant = None
    if chosen.spans != picked.spans:
        variant = {"objective_ms": modelled_ms(chosen, priced), **describe(chosen, heads, shape["head_dim"], ulysses)}
        if device is not None:
            variant["measured"] = replay(chosen, heads, kv_heads, shape["head_dim"], ulysses, backend, device)
    timed = "measured" if device is not None else "modelled"
    part = (lambda c: c[timed]["both"]) if device is not None else (lambda c: c["modelled"])
    return {
        "case": name, "world_size": world, "ulysses": ulysses, "ring": ring, "heads_per_rank": heads, "kv_heads_per_rank": kv_heads,
        "tokens": sum(lengths), "documents": len(lengths), "longest": max(lengths), "placement_host_s": placement_seconds,
        "candidates": candidates,
        "chosen_index": next(i for i, c in enumerate(candidates) if c["chosen"]),
        # by the measured times where the candidates were replayed, else by the model's
        "fastest_index": min(range(len(candidates)), key=lambda i: part(candidates[i])["slowest_ms"]),
        "least_work_index": min(range(len(candidates)), key=lambda i: part(candidates[i])["sum_ms"]),
        "ranked_by": timed,
        # the layout's placement, the chosen candidate with its kept documents traded (plan/kept_trades.py), where a trade applies
        "kept_documents_traded": variant,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dry-run", action="store_true", help="CPU, reference backend, 8:2 heads of 16, 64 tokens per GPU")
    parser.add_argument("--plans-only", action="store_true", help="CPU: the candidates' plans and model at the cases' sizes, no replay")
    add_forward_option_arguments(parser)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    options = apply_forward_options(args)
    if args.dry_run:
        device, shape = torch.device("cpu"), {"heads": 8, "kv_heads": 2, "head_dim": 16}
        backend = get_backend("reference")
    elif args.plans_only:
        device, shape, backend = None, {"heads": 32, "kv_heads": 8, "head_dim": 128}, None
    else:
        device, shape = torch.device("cuda"), {"heads": 32, "kv_heads": 8, "head_dim": 128}
        backend = get_backend("fa4", torch.empty(1, 1, 1, shape["head_dim"], device=device, dtype=torch.bfloat16))
    result = record(
        "placement_replay", "cpu" if device is None else device.type, **shape, causal=True, dtype="bfloat16",
        method=(
            "plans and the kernel model only (placement.rank_costs_ms at the ring rank's heads): nothing timed" if device is None else
            "each placement candidate's ring ranks replayed alone (bench/replay.py: real kernels, all of them, no transfers, no "
            "all-to-alls), CUDA events, median of 3 after one warm-up, launches queued behind a sleep kernel; beside each, the "
            "kernel model at the ring rank's heads (placement.rank_costs_ms)"
        ) + "; sums count every ulysses rank of a ring rank",
        **options, rows=[],
    )
    for name in args.cases:
        mix, tokens, world, ulysses = CASES[name]
        began = time.monotonic()
        lengths = lognormal_lengths(64 * world if args.dry_run else tokens, mix)
        row = run_case(name, lengths, world, ulysses, shape, backend, device)
        row["seconds"] = time.monotonic() - began
        result["rows"].append(row)
        write(result, args.out)
        for index, candidate in enumerate(row["candidates"]):
            marks = " ".join(mark for mark, which in (("chosen", "chosen_index"), ("fastest", "fastest_index"), ("least-work", "least_work_index")) if row[which] == index)
            model, measured = candidate["modelled"], candidate.get("measured", {}).get("both")
            timed = f"measured slowest {measured['slowest_ms']:.3f} sum {measured['sum_ms']:.1f} ms; " if measured else ""
            print(
                f"{name:18} #{index} widest {candidate['widest_span']:<2} spread {candidate['spread_documents']:<3} "
                f"q tiles {candidate['plans']['q_tiles']:<6} blocks {candidate['plans']['blocks']:<4} {timed}"
                f"model slowest {model['slowest_ms']:.3f} sum {model['sum_ms']:.1f} ms  {marks}", flush=True,
            )
        traded = row["kept_documents_traded"]
        if traded is not None:
            measured = traded.get("measured", {}).get("both")
            timed = f"measured slowest {measured['slowest_ms']:.3f} sum {measured['sum_ms']:.1f} ms; " if measured else ""
            print(
                f"{name:18} chosen, kept documents traded: {timed}model slowest {traded['modelled']['slowest_ms']:.3f} "
                f"sum {traded['modelled']['sum_ms']:.1f} ms (the layout's placement; {row['placement_host_s']:.3f} s on the host)", flush=True,
            )


if __name__ == "__main__":
    main()
