"""Predictions of fa4_cp.plan_mesh: for each ring size, the best Ulysses x ring split's efficiency
against the plain ring's, on H200 (measured parts) and GB200 NVL72 (assumed), dense sequences and
packed documents, 8K and 2K tokens per GPU, 32:8 heads of 128. Writes JSON and a PNG.

    python bench/mesh_model.py --out-dir bench/results/cpu_2026-12-01
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from common import record, write

from fa4_cp.tuning.mesh_model import GB200_NVL72, H200, plan_mesh

WORLD_SIZES = (8, 16, 24, 32, 48, 64, 72)
PER_GPU = (8192, 2048)


def documents(total: int, seed: int = 0) -> list[int]:
    """A lognormal mix of document lengths (median 1K tokens, a long tail) packed to `total`."""
    generator, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(max(1, int(generator.lognormvariate(6.9, 1.2))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="bench/results/cpu_2026-12-01")
    args = parser.parse_args()
    rows = []
    for machine in (H200, GB200_NVL72):
        for packed in (False, True):
            for per_gpu in PER_GPU:
                for world in WORLD_SIZES:
                    total = world * per_gpu
                    plan = plan_mesh(world, 32, 8, total, documents=documents(total) if packed else None, machine=machine)
                    ring = next(c for c in plan.candidates if c["ulysses"] == 1)
                    rows.append({
                        "machine": machine.name, "packed": packed, "tokens_per_gpu": per_gpu, "world_size": world,
                        "best": {"ulysses": plan.ulysses, "ring": plan.ring, "ms": plan.predicted_ms, "efficiency": plan.efficiency},
                        "plain_ring": {"ms": ring["ms"], "efficiency": ring["efficiency"]}, "reason": plan.reason,
                    })
    out = Path(args.out_dir)
    write(record("mesh_model", "cpu", heads=32, kv_heads=8, head_dim=128, causal=True,
                 machines={m.name: {**vars(m)} for m in (H200, GB200_NVL72)}, predictions=rows), out / "mesh_model.json")
    plot(rows, out / "mesh_model.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, machine in zip(axes, (H200.name, GB200_NVL72.name)):
        for packed in (False, True):
            for per_gpu, style in zip(PER_GPU, ("-", "--")):
                chosen = [r for r in rows if r["machine"] == machine and r["packed"] == packed and r["tokens_per_gpu"] == per_gpu]
                label = f"{'packed' if packed else 'dense'} {per_gpu // 1024}K/GPU"
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
