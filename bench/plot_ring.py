"""Plot bench/ring.py results: ring efficiency and speedup over torch's context_parallel vs S per GPU.

    python bench/plot_ring.py bench/results/ring_*_w2.json bench/results/ring_*_w4.json --out ring.png

Needs only the JSON files and matplotlib. Columns are the modes (fwd, fwdbwd); the top row is
efficiency T_single / (W * T_ring) with the 90% and 97% targets dashed, the bottom row
T_torch / T_ring. One line per (W, heads, transport): color by W and transport, dashes by heads.
"""

from __future__ import annotations

import argparse
import json
import sys

# (metric, y label, dashed reference lines and their label format): the efficiency targets, parity with torch.
PANELS = (
    ("efficiency", "efficiency  T1 / (W·Tring)", (0.90, 0.97), "{:.0%}"),
    ("speedup_vs_torch", "speedup  Ttorch / Tring", (1.0,), "{:.0f}x"),
)
HEAD_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot_ring.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def series(records: list[dict], metric: str, mode: str) -> dict[tuple, list[tuple[int, float]]]:
    """(W, heads, transport) -> [(S per GPU, value)] for one metric and mode, missing values left out."""
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for record in records:
        for row in record["results"]:
            if row["mode"] != mode:
                continue
            for transport, value in row[metric].items():
                if value is not None:
                    key = (record["gpus"], f"{row['heads']}:{row['kv_heads']}", transport)
                    lines.setdefault(key, []).append((row["seq_per_gpu"], value))
    return {key: sorted(points) for key, points in sorted(lines.items())}


def _label_tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def plot(records: list[dict], out: str) -> None:
    plt = _pyplot()
    rows = [row for record in records for row in record["results"]]
    modes = sorted({row["mode"] for row in rows}, key=["fwd", "fwdbwd"].index)
    heads = sorted({f"{row['heads']}:{row['kv_heads']}" for row in rows})
    seqs = sorted({row["seq_per_gpu"] for row in rows})
    colors: dict[tuple, str] = {}
    figure, axes = plt.subplots(len(PANELS), len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for column, mode in enumerate(modes):
        for (metric, label, references, reference_format), ax in zip(PANELS, axes[:, column]):
            ax.set_title(f"{mode}, causal, {records[0]['device']}")
            lines = series(records, metric, mode)
            if not lines:
                ax.text(0.5, 0.5, f"no {metric} (failed or skipped)", transform=ax.transAxes, ha="center", color="gray")
                ax.set_axis_off()
                continue
            for (world, head, transport), points in lines.items():
                color = colors.setdefault((world, transport), f"C{len(colors)}")
                xs, ys = zip(*points)
                ax.plot(xs, ys, HEAD_STYLES[heads.index(head) % len(HEAD_STYLES)], marker="o", color=color, label=f"W={world} {head} {transport}")
            for value in references:
                ax.axhline(value, color="gray", linestyle="--", linewidth=0.8)
                ax.annotate(reference_format.format(value), (1, value), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7, color="gray")
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [_label_tokens(n) for n in seqs])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel("tokens per GPU")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by bench/ring.py")
    parser.add_argument("--out", default="ring.png")
    args = parser.parse_args()
    records = []
    for path in args.results:
        with open(path) as f:
            records.append(json.load(f))
    plot(records, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
