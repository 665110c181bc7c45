"""Error against fp64 as the ring grows: the same tokens on W = 1 ... 72 simulated ranks (CPU).

    python bench/ring_error_growth.py

Uses the tests' oracle (tests/oracle.py): causal zigzag, 576 tokens, GQA 4:4, head_dim 16.
Writes bench/results/ring_error_growth_cpu_<date>.json and prints max |error| per tensor.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from oracle import CASES_BY_NAME, TENSORS, errors_against, make_inputs, reference_results, ring_results_for_rank, unshard_results  # noqa: E402

from fa4_cp import SimulatedRing  # noqa: E402

WORLD_SIZES = (1, 2, 8, 72)


def main() -> None:
    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], fixed_seq_len=4 * 144)
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(case, 72, dtype, seed=7)
        truth = reference_results(case, 72, inputs, torch.float64)
        same_precision = errors_against(truth, reference_results(case, 72, inputs, dtype))
        for world in WORLD_SIZES:
            per_rank = SimulatedRing(world).run(lambda group: ring_results_for_rank(case, world, inputs, group, group.rank))
            errors = errors_against(truth, unshard_results(case, world, per_rank))
            runs.append({"dtype": str(dtype), "world_size": world, "max_abs_error": errors, "same_precision_reference": same_precision})
    record = {
        "benchmark": "ring_error_growth",
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), reference backend, simulated ring",
        "torch": torch.__version__,
        "case": dataclasses.asdict(case),
        "runs": runs,
    }
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ring_error_growth_cpu_{record['date']}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{'dtype':<16}{'W':>4}" + "".join(f"{name:>11}" for name in TENSORS) + "   (max |error| vs fp64)")
    for run in runs:
        print(f"{run['dtype']:<16}{run['world_size']:>4}" + "".join(f"{run['max_abs_error'][n]:>11.2e}" for n in TENSORS))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
