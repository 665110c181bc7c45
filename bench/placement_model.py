"""The balanced placement under the ring's kernel model (tuning/kernel_cost.RING), on CPU: for each
packed mix of bench/mixes.py and ring size, the modelled time of the most loaded rank's attention
kernels plus the ring steps' fixed cost, its imbalance (most loaded / mean), the active steps, the
short documents (under 2K tokens) cut over several ranks and the planning host time; for the
placement kept, for the greedy candidate it traded kept documents from (`untraded`), and for the greedy by
one device's costs alone (the placement before session 12). Beside the slowest rank's fwd + bwd, the most
loaded rank of each pass summed (`slowest_passes_ms`, the layout's objective since session 21): the
ring waits for each pass's slowest rank.
And plan_mesh's host time for the batch (32:8 heads of 128), placing only the splits that can
win and every split, each from cold caches.
A model, not a measurement: bench/magi_replay.py measures the placements on a GPU.

    python bench/placement_model.py --out bench/results/cpu_<date>/placement_model.json
"""

from __future__ import annotations

import argparse
import time

from common import record, write
from mixes import add_mix_arguments, batches

from fa4_cp.plan import placement
from fa4_cp.plan.placement import _greedy_placement, balanced_sharding, modelled_ms, placement_candidates, rank_costs_ms
from fa4_cp.tuning.kernel_cost import ONE_DEVICE
from fa4_cp.tuning.mesh_model import plan_mesh

SHORT = 2048


def modelled(sharding) -> dict:
    costs = rank_costs_ms(sharding)
    load = [forward + backward for forward, backward in costs]
    passes = [max(cost[part] for cost in costs) for part in (0, 1)]
    # the layout's objective: the ring waits for each pass's most loaded rank, so where they differ this exceeds the
    # slowest rank's fwd + bwd
    objective = modelled_ms(sharding)
    return {
        "slowest_rank_ms": objective - sum(passes) + max(load), "imbalance": max(load) / (sum(load) / sharding.world_size),
        "slowest_passes_ms": objective,
        "pass_imbalance": [most / (sum(cost[part] for cost in costs) / sharding.world_size) for part, most in enumerate(passes)],
        "active_steps": max(ranks for _, ranks in sharding.spans),
        "short_documents_cut": sum(1 for length, (_, ranks) in zip(sharding.doc_lengths, sharding.spans) if length < SHORT and ranks > 1),
    }


def clear_placement_caches() -> None:
    """Cold caches, as a batch of new documents meets them."""
    for cache in (placement.balanced_sharding, placement.span_cost, placement._span_us):
        cache.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mix_arguments(parser, [8, 16, 32, 64, 72])
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for mix, world_size, lengths in batches(args.mixes, args.world_sizes, args.tokens_per_gpu):
        lengths = tuple(lengths)
        clear_placement_caches()
        began = time.perf_counter()
        kept = balanced_sharding(lengths, world_size)
        planning_ms = (time.perf_counter() - began) * 1e3
        before = _greedy_placement(lengths, world_size, ONE_DEVICE, False, 0.0)[1]
        clear_placement_caches()
        began = time.perf_counter()
        picked = min(placement_candidates(lengths, world_size), key=lambda pair: pair[0])[1]
        untraded_ms = (time.perf_counter() - began) * 1e3
        row = {
            "mix": mix, "world_size": world_size, "documents": len(lengths), "planning_host_ms": planning_ms,
            "untraded_planning_host_ms": untraded_ms,
            # kept: the layout's placement; untraded: the greedy candidate it traded kept documents from
            "kept": modelled(kept), "untraded": modelled(picked), "one_device_greedy": modelled(before),
        }
        row["kept_over_one_device_greedy"] = row["kept"]["slowest_passes_ms"] / row["one_device_greedy"]["slowest_passes_ms"]
        row["plan_mesh"] = {"host_ms": {}, "splits_placed": {}}
        for every_split in (False, True):
            clear_placement_caches()
            began = time.perf_counter()
            plan = plan_mesh(world_size, 32, 8, sum(lengths), documents=list(lengths), every_split=every_split)
            key = "every_split" if every_split else "can_win"
            row["plan_mesh"]["host_ms"][key] = (time.perf_counter() - began) * 1e3
            row["plan_mesh"]["splits_placed"][key] = [c["ulysses"] for c in plan.candidates]
        rows.append(row)
        print(
            f"{mix:9} W={world_size:<3} kept {row['kept']['slowest_rank_ms']:.3f} ms (passes {row['kept']['slowest_passes_ms']:.3f}; "
            f"untraded {row['untraded']['slowest_rank_ms']:.3f}, passes {row['untraded']['slowest_passes_ms']:.3f}; imbalance {row['kept']['imbalance']:.3f}, "
            f"{row['kept']['active_steps']} steps, {row['kept']['short_documents_cut']} short cut) | one-device greedy "
            f"{row['one_device_greedy']['slowest_rank_ms']:.3f} ms ({row['one_device_greedy']['imbalance']:.3f}, "
            f"{row['one_device_greedy']['active_steps']}, {row['one_device_greedy']['short_documents_cut']}) | "
            f"{row['kept_over_one_device_greedy']:.3f}; planned in {planning_ms:.0f} ms; plan_mesh "
            f"{row['plan_mesh']['host_ms']['can_win']:.0f} ms (every split {row['plan_mesh']['host_ms']['every_split']:.0f})", flush=True,
        )
    write(record(
        "placement_model", "cpu", tokens_per_gpu=args.tokens_per_gpu, heads=64, head_dim=128, causal=True,
        method="a model: tuning/kernel_cost.RING costs of every rank's spans, the most loaded rank plus the widest span's steps "
        "x kernel_cost.step_us; 'one_device_greedy' is the greedy by kernel_cost.ONE_DEVICE alone, the placement before session 12",
        rows=rows,
    ), args.out)


if __name__ == "__main__":
    main()
