"""Error against fp64 as the ring grows: the same tokens on W = 1 ... 72 simulated ranks (CPU).

    python bench/ring_error_growth.py

Uses the tests' oracle (tests/oracle.py): causal zigzag, 576 tokens, GQA 4:4, head_dim 16.
Writes bench/results/ring_error_growth_cpu_<date>.json and prints max |error| per tensor.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from oracle import CASES_BY_NAME, TENSORS, errors_against, make_inputs, reference_results, ring_results_for_rank, unshard_results  # noqa: E402

from common import RESULTS, record, today, write  # noqa: E402
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
    result = record("ring_error_growth", "cpu", setup="reference backend, simulated ring", case=dataclasses.asdict(case), runs=runs)
    write(result, RESULTS / f"ring_error_growth_cpu_{today()}.json")
    print(f"{'dtype':<16}{'W':>4}" + "".join(f"{name:>11}" for name in TENSORS) + "   (max |error| vs fp64)")
    for run in runs:
        print(f"{run['dtype']:<16}{run['world_size']:>4}" + "".join(f"{run['max_abs_error'][n]:>11.2e}" for n in TENSORS))


if __name__ == "__main__":
    main()
