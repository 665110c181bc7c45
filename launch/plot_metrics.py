"""Plot a run's metrics log: loss and tokens/s per GPU against step, in two panels.

    python launch/plot_metrics.py metrics.jsonl --out curves.png

matplotlib is imported only when plotting, so training does not depend on it.
"""

import argparse
import json
import sys
from pathlib import Path

PANELS = (("loss", "loss"), ("tokens_per_s_per_gpu", "tokens/s per GPU"))


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL log; a line that does not parse (a crash mid-write) is skipped with a note."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{number}: not JSON, skipped", file=sys.stderr)
    return records


def plot(records: list[dict], out: Path) -> None:
    """Save one panel per entry of PANELS, each over the steps whose record has that key."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_metrics.py needs matplotlib, which training does not install: pip install matplotlib")
    figure, axes = plt.subplots(len(PANELS), 1, sharex=True, figsize=(8, 6))
    for axis, (key, label) in zip(axes, PANELS):
        points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
        axis.plot([step for step, _ in points], [value for _, value in points])
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="metrics.jsonl written by the trainer")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="image to write")
    args = parser.parse_args(argv)
    records = read_records(args.metrics)
    if not records:
        raise SystemExit(f"{args.metrics}: no records to plot")
    plot(records, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
