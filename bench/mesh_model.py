"""Predictions of fa4_cp.plan_mesh: for each ring size, the best Ulysses x ring split's efficiency
against the plain ring's, on H200 (measured parts) and GB200 NVL72 (assumed), dense sequences and
the two packed mixes of bench/mixes.py (pretraining-like, fine-tuning-like; placed per split as the
balanced layout places them, costed by the calibrated kernel model), 8K and 2K tokens per GPU,
32:8 heads of 128. A model, not a measurement. Writes JSON and a PNG.

    python bench/mesh_model.py --out-dir bench/results/cpu_2026-12-04
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import record, write
from mixes import lognormal_lengths

from fa4_cp.tuning.mesh_model import GB200_NVL72, H200, plan_mesh

WORLD_SIZES = (8, 16, 24, 32, 48, 64, 72)
PER_GPU = (8192, 2048)
DATA = ("dense", "pretrain", "finetune")


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
                    plan = plan_mesh(world, 32, 8, total, documents=lengths, machine=machine)
                    ring = next(c for c in plan.candidates if c["ulysses"] == 1)
                    rows.append({
                        "machine": machine.name, "data": data, "tokens_per_gpu": per_gpu, "world_size": world,
                        "best": {"ulysses": plan.ulysses, "ring": plan.ring, "ms": plan.predicted_ms, "efficiency": plan.efficiency},
                        "plain_ring": {"ms": ring["ms"], "efficiency": ring["efficiency"]}, "reason": plan.reason,
                    })
    out = Path(args.out_dir)
    write(record("mesh_model", "cpu", heads=32, kv_heads=8, head_dim=128, causal=True,
                 machines={m.name: {**vars(m)} for m in (H200, GB200_NVL72)}, predictions=rows), out / "mesh_model.json")
    try:
        plot(rows, out / "mesh_model.png")
    except ImportError as error:  # the PNG is a convenience; the JSON holds every figure
        print(f"no PNG: {error}")


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
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
