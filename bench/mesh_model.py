"""Predictions of fa4_cp.plan_mesh: for each ring size, the best Ulysses x ring split's efficiency
against the plain ring's, on H200 (measured parts) and GB200 NVL72 (assumed), dense sequences and
the two packed mixes of bench/mixes.py (pretraining-like, fine-tuning-like; placed per split as the
balanced layout places them, costed by the calibrated kernel model), 8K and 2K tokens per GPU,
32:8 heads of 128. A model, not a measurement. Writes JSON and a PNG.

Each 2-D split is predicted in the head chunks plan_mesh finds fastest for it (runtime/ulysses.py's
pipeline; `best.head_chunks`).

And two bounds for the ring of every row (`gather_what_if`): issue 27's sparse gather, in one
stage, not built (each rank fetches at once, from every span peer, all the KV its blocks read,
runs them as one launch, and returns dK/dV to the owners), and the ceiling with no communication
and no per-step cost at all (`no_transfer_ceiling`): the attention, the all-to-alls and the call's
work beside attention alone. For packed documents, a third (`hop_aware_placement_what_if`): the plain
ring on whichever of the balanced layout's candidate placements this model, hops included, finds
fastest, where the layout keeps the one whose slowest rank plus its steps' fixed cost is least
(blind to the hops' latency, which a step of little compute does not hide).

    python bench/mesh_model.py --out-dir bench/results/cpu_2026-12-04
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common import record, write
from mixes import lognormal_lengths

from fa4_cp.plan.placement import placement_candidates, rank_costs_ms
from fa4_cp.tuning.mesh_model import BACKWARD_FLOPS_RATIO, GB200_NVL72, H200, Machine, hop_ms, plan_mesh, predict_split

WORLD_SIZES = (8, 16, 24, 32, 48, 64, 72)
PER_GPU = (8192, 2048)
DATA = ("dense", "pretrain", "finetune")


def gathered_ms(candidate: dict, machine: Machine) -> float | None:
    """A candidate's predicted ms were its ring steps one gather instead (None: a ring of one step).

    Forward: the rank's own block (one step's mean compute) hides the gather of every remote row
    the ring's hops bring (one latency; the bytes at the hop bandwidth), then the remote blocks
    run; the backward gathers again beside its own block and ends with the fp32 dK/dV sent home,
    exposed. Two launches' fixed cost a pass instead of one per step."""
    steps = candidate["active_steps"]
    if steps < 2:
        return None
    forward = candidate["compute_ms"] / (1 + BACKWARD_FLOPS_RATIO)
    backward = candidate["compute_ms"] - forward
    remote_bytes = candidate["hop_bytes"] * (steps - 1)
    gather = hop_ms(remote_bytes, machine)
    passes = (
        max(forward / steps, gather) + forward * (steps - 1) / steps
        + max(backward / steps, gather) + backward * (steps - 1) / steps + hop_ms(2 * remote_bytes, machine)
    )
    return passes + 2 * machine.step_overhead_ms + candidate["all_to_all_ms"] + candidate["call_ms"]


def gather_what_if(plan, machine: Machine) -> dict:
    """Efficiency of the chosen split and the plain ring as they are, gathered in one stage, and
    with no transfer or step cost at all."""
    ideal_ms = plan.predicted_ms * plan.efficiency
    rows = {}
    for name, candidate in (("chosen", next(c for c in plan.candidates if c["ulysses"] == plan.ulysses)),
                            ("plain_ring", next(c for c in plan.candidates if c["ulysses"] == 1))):
        gathered = gathered_ms(candidate, machine)
        ceiling = candidate["compute_ms"] + candidate["all_to_all_ms"] + candidate["call_ms"]
        rows[name] = {
            "ulysses": candidate["ulysses"], "active_steps": candidate["active_steps"], "efficiency": ideal_ms / candidate["ms"],
            "gathered_efficiency": None if gathered is None else ideal_ms / gathered,
            "no_transfer_ceiling": ideal_ms / ceiling,
        }
    return rows


def hop_aware_placement_what_if(plan, lengths: list[int], heads: int, kv_heads: int, machine: Machine) -> dict:
    """The plain ring on the balanced layout's candidate placement (placement.placement_candidates)
    that the model with hops finds fastest, against the one the layout keeps."""
    world = plan.ulysses * plan.ring
    ideal_ms = plan.predicted_ms * plan.efficiency
    kept = next(c for c in plan.candidates if c["ulysses"] == 1)
    best = None
    for _, placement in placement_candidates(tuple(lengths), world):
        candidate = predict_split(1, world, heads, kv_heads, sum(lengths), 128, True, lengths, machine, placement)
        costs = [sum(cost) for cost in rank_costs_ms(placement)]
        candidate["imbalance"] = max(costs) / (sum(costs) / len(costs))
        if best is None or candidate["ms"] < best["ms"]:
            best = candidate
    return {
        "kept": {"active_steps": kept["active_steps"], "efficiency": ideal_ms / kept["ms"]},
        "hop_aware": {"active_steps": best["active_steps"], "efficiency": ideal_ms / best["ms"], "imbalance": best["imbalance"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="bench/results/cpu_2026-12-04")
    args = parser.parse_args()
    rows = []
    for machine in (H200, GB200_NVL72):
        for data in DATA:
            for per_gpu in PER_GPU:
                for world in WORLD_SIZES:
                    total = world * per_gpu
                    lengths = None if data == "dense" else lognormal_lengths(total, data, seed=world)
                    plan = plan_mesh(world, 32, 8, total, documents=lengths, machine=machine, every_split=True)
                    ring = next(c for c in plan.candidates if c["ulysses"] == 1)
                    rows.append({
                        "machine": machine.name, "data": data, "tokens_per_gpu": per_gpu, "world_size": world,
                        "best": {
                            "ulysses": plan.ulysses, "ring": plan.ring, "head_chunks": plan.head_chunks, "ms": plan.predicted_ms,
                            "efficiency": plan.efficiency,
                        },
                        "plain_ring": {"ms": ring["ms"], "efficiency": ring["efficiency"]}, "reason": plan.reason,
                        "gather_what_if": gather_what_if(plan, machine),
                        "hop_aware_placement_what_if": None if lengths is None else hop_aware_placement_what_if(plan, lengths, 32, 8, machine),
                    })
    out = Path(args.out_dir)
    write(record("mesh_model", "cpu", heads=32, kv_heads=8, head_dim=128, causal=True,
                 machines={m.name: {**vars(m)} for m in (H200, GB200_NVL72)}, predictions=rows,
                 step_overhead_sensitivity=step_overhead_sensitivity()), out / "mesh_model.json")
    try:
        plot(rows, out / "mesh_model.png")
    except ImportError as error:  # the PNG is a convenience; the JSON holds every figure
        print(f"no PNG: {error}")


def step_overhead_sensitivity() -> list[dict]:
    """H200 at 8K tokens per GPU, W = 16, 64, 72, with the per-step overhead as fitted on the replay
    and at the 0.19 ms the model took before (measured 2026-11-21, with the backward's per-step
    kernels) and 0.1 ms: what the figure changes."""
    rows = []
    for overhead in (H200.step_overhead_ms, 0.19, 0.1):
        machine = dataclasses.replace(H200, step_overhead_ms=overhead)
        for data in DATA[1:]:
            for world in (16, 64, 72):
                lengths = lognormal_lengths(world * 8192, data, seed=world)
                plan = plan_mesh(world, 32, 8, world * 8192, documents=lengths, machine=machine)
                rows.append({"step_overhead_ms": overhead, "data": data, "world_size": world, "ulysses": plan.ulysses,
                             "ring": plan.ring, "efficiency": plan.efficiency})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, machine in zip(axes, (H200.name, GB200_NVL72.name)):
        for data in DATA:
            for per_gpu, style in zip(PER_GPU, ("-", "--")):
                chosen = [r for r in rows if r["machine"] == machine and r["data"] == data and r["tokens_per_gpu"] == per_gpu]
                label = f"{data} {per_gpu // 1024}K/GPU"
                worlds = [r["world_size"] for r in chosen]
                line, = axis.plot(worlds, [r["best"]["efficiency"] for r in chosen], style, marker="o", label=f"best split, {label}")
                axis.plot(worlds, [r["plain_ring"]["efficiency"] for r in chosen], style, color=line.get_color(), alpha=0.4, label=f"plain ring, {label}")
        axis.set_title(machine)
        axis.set_xlabel("ranks W")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("predicted efficiency (attention compute / call time)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    # a 96-colour palette: a quarter of the bytes (the tree travels to the GPU machine under a size limit)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=96).save(path, optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
