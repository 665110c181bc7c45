"""Errors against fp64 of the ring's sinks, softcap and varlen-window cases, and of the
same-precision single-device reference that sets the 2x rule's bound: one JSON row per case,
ring size and dtype (the oracle of tests/, a simulated ring of W virtual ranks). With the FA4
backend that reference is upstream FA4 on the full sequence (as in tests/gpu), else the oracle's.

    python bench/feature_errors.py --out bench/results/cpu_2026-12-01/feature_errors.json
    python bench/feature_errors.py --device cuda --backend fa4 --out ...   # FA4 on one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))
from common import record, write  # noqa: E402
from oracle import CASES_BY_NAME, DTYPES, errors_against, make_inputs, on_cuda, reference_results, ring_results_for_rank, unshard_results  # noqa: E402

from fa4_cp import SimulatedRing  # noqa: E402

CASE_NAMES = [
    "sinks_causal_gqa", "sinks_window", "sinks_balanced_window", "softcap_causal", "softcap_sinks_balanced_gqa",
    "balanced_window", "varlen_window_zigzag_gqa", "varlen_window_both_sides_contiguous",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 72])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    if args.backend == "fa4":
        from fa4_baseline import upstream_results as single_device
    else:
        single_device = reference_results
    for name in CASE_NAMES:
        case = CASES_BY_NAME[name]
        if args.backend == "fa4":
            case = dataclasses.replace(case, head_dim=64)
        for world in args.world_sizes:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                inputs = make_inputs(case, world, dtype, seed=world)
                truth = reference_results(case, world, inputs, torch.float64)
                single = errors_against(truth, single_device(case, world, inputs, dtype))
                device_inputs = on_cuda(inputs) if args.device == "cuda" else inputs
                per_rank = SimulatedRing(world).run(
                    lambda group: ring_results_for_rank(case, world, device_inputs, group, group.rank, backend=args.backend)
                )
                ring = errors_against(truth, unshard_results(case, world, per_rank))
                ratio = {t: ring[t] / single[t] if single[t] else None for t in ring}
                rows.append({"case": name, "world_size": world, "dtype": dtype_name, "ring_error": ring, "single_device_error": single, "ratio": ratio})
                print(f"{name:38s} W={world:<3d} {dtype_name:5s} " + " ".join(f"{t}={ring[t]:.2e}/{single[t]:.2e}" for t in ring))
    single_name = "upstream FA4" if args.backend == "fa4" else "the oracle's reference"
    result = record("feature_errors", args.device, backend=args.backend, single_device=single_name, rule="ring error <= 2 x single-device error + atol", rows=rows)
    if args.out:
        write(result, args.out)


if __name__ == "__main__":
    main()
