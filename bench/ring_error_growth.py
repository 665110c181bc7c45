"""Error against fp64 as the ring grows: the same tokens on W = 1 ... 72 simulated ranks.

    python bench/ring_error_growth.py                                   # reference backend, CPU
    python bench/ring_error_growth.py --backend fa4 --out results/...   # FA4 on one GPU

Uses the tests' oracle (tests/oracle.py), causal zigzag. CPU: 576 tokens, 4:4 heads, head_dim 16,
fp32 and bf16, against the oracle in the same precision. FA4: 9216 tokens, 8:2 heads, head_dim
128, bf16, against upstream FA4 on one device (the bound of FlashAttention's rule). Each row
gives max |error| per tensor, and its ratio to W = 1 (the target: within 1.1x at W = 72).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
from oracle import CASES_BY_NAME, TENSORS, errors_against, make_inputs, on_cuda, reference_results, ring_results_for_rank, unshard_results  # noqa: E402

from common import RESULTS, record, today, write  # noqa: E402
from fa4_cp import SimulatedRing  # noqa: E402

WORLD_SIZES = (1, 2, 8, 72)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("reference", "fa4"), default="reference")
    parser.add_argument("--out")
    args = parser.parse_args()
    fa4 = args.backend == "fa4"
    case = CASES_BY_NAME["causal_zigzag"]
    if fa4:
        from fa4_baseline import upstream_results as same_precision_reference

        case = dataclasses.replace(case, fixed_seq_len=72 * 2 * 64, heads=8, kv_heads=2, head_dim=128, batch=1)
        dtypes = (torch.bfloat16,)
    else:
        case = dataclasses.replace(case, fixed_seq_len=4 * 144)
        dtypes = (torch.float32, torch.bfloat16)

        def same_precision_reference(case, world, inputs, dtype):
            return reference_results(case, world, inputs, dtype)

    runs = []
    for dtype in dtypes:
        inputs = make_inputs(case, 72, dtype, seed=7)
        ring_inputs = on_cuda(inputs) if fa4 else inputs
        truth = reference_results(case, 72, inputs, torch.float64)  # the oracle builds its masks on the host
        same_precision = errors_against(truth, same_precision_reference(case, 72, inputs, dtype))
        for world in WORLD_SIZES:
            per_rank = SimulatedRing(world).run(
                lambda group: ring_results_for_rank(case, world, ring_inputs, group, group.rank, backend=args.backend)
            )
            errors = errors_against(truth, unshard_results(case, world, per_rank))
            runs.append({"dtype": str(dtype), "world_size": world, "max_abs_error": errors, "same_precision_reference": same_precision})
    for run in runs:
        first = next(r for r in runs if r["dtype"] == run["dtype"])["max_abs_error"]
        run["vs_world_size_1"] = {name: run["max_abs_error"][name] / first[name] if first[name] else None for name in TENSORS}
    device = "cuda" if fa4 else "cpu"
    setup = f"{args.backend} backend, simulated ring" + (", same-precision reference: upstream FA4 on one device" if fa4 else "")
    result = record("ring_error_growth", device, setup=setup, case=dataclasses.asdict(case), runs=runs)
    write(result, args.out or RESULTS / f"ring_error_growth_{device}_{today()}.json")
    print(f"{'dtype':<16}{'W':>4}" + "".join(f"{name:>11}" for name in TENSORS) + "   (max |error| vs fp64; x W = 1)")
    for run in runs:
        print(f"{run['dtype']:<16}{run['world_size']:>4}" + "".join(f"{run['max_abs_error'][n]:>11.2e}" for n in TENSORS))
        print(" " * 20 + "".join(f"{run['vs_world_size_1'][n] or 0:>11.3f}" for n in TENSORS))


if __name__ == "__main__":
    main()
