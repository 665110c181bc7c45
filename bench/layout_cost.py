"""What the Ulysses exchange's layout copies cost, and what charging them changes in plan_mesh's picks.

    python bench/layout_cost.py results/nvidia_h100_2026-12-07_s28/gpu_work.json.gz --out PATH

A 2-D call copies every tensor it exchanges into a send buffer and out of the receive region (q,
k, v and out forward, dout, dq, dk and dv backward; runtime/ulysses.py): SM copies on the compute
stream, on any transport. From a gpu_work JSON, which times them apart (`all_to_all_layout`),
this fits their rate: `mesh_model.layout_bytes` per rank (as the run's code copied: `--code`, one of
mesh_model.LAYOUT_CODES) over their ms per rank (the H100's rate is tuning/mesh_model.py's
LAYOUT_H100_GIB_PER_S). Then, a model and not a measurement, it
predicts every split of plan_mesh for the two packed mixes (64:8 heads of 128, 8K tokens per GPU,
MagiAttention's metric's shape) on the H200 machine with the SM copies the code makes now charged
(plan_mesh as it is: the H100's rate scaled by HBM bandwidth, assumed), at the H100's rate, without
them, and without the copy engine's placing of what arrives either (`Machine.local_copy_gib_per_s`,
assumed; no copies at all, as plan_mesh before 2026-12-07).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
from pathlib import Path

from common import record, write
from mixes import lognormal_lengths

from fa4_cp.tuning import mesh_model

WORLD_SIZES = (8, 16, 32, 64, 72)


def _median_rate(gpu_work: dict, ms_kind: str, ms_name: str, nbytes_of, cases_of=lambda case: True) -> tuple[float | None, list[dict]]:
    """The median GiB/s over gpu_work's 2-D cases (those `cases_of` takes) of `nbytes_of(case, u,
    r, heads, kv_heads)` bytes per rank over the ms per rank of `ring_ms[ms_kind]` (recorded as
    `ms_name`), leaving out cases with neither; None where none is left."""
    cases = []
    for name, case in gpu_work["cases"].items():
        if not isinstance(case, dict) or case.get("ulysses", 1) == 1 or "ring_ms" not in case or not cases_of(case):
            continue
        u, world = case["ulysses"], case["world_size"]
        per_rank_ms = case["ring_ms"].get(ms_kind, 0.0) / world
        heads, kv_heads = case.get("heads", (32, 8))  # 32:8 where the JSON has none
        nbytes = nbytes_of(case, u, world // u, heads, kv_heads)
        if nbytes and per_rank_ms:
            cases.append({"case": name, ms_name: per_rank_ms, "bytes_per_rank": nbytes, "gib_per_s": nbytes / 2**30 / (per_rank_ms / 1e3)})
    rates = sorted(c["gib_per_s"] for c in cases)
    return (rates[len(rates) // 2] if rates else None), cases


def fitted_rate(gpu_work: dict, code: str) -> tuple[float | None, list[dict]]:
    """GiB/s of SM layout copies: bytes per rank (the copies of the code that ran, `code`) over ms
    per rank. None where the run's code made none (`code` "placed")."""
    return _median_rate(
        gpu_work, "all_to_all_layout", "layout_ms_per_rank",
        lambda case, u, r, heads, kv_heads: mesh_model.layout_bytes(u, r, heads, kv_heads, case["tokens"], gpu_work["head_dim"], code),
    )


def fitted_copy_engine_rate(gpu_work: dict) -> tuple[float | None, list[dict]]:
    """GiB/s of the copy engine's placing (code "placed"), over the un-chunked 2-D cases: the bytes a
    rank places from its peers (`mesh_model.placed_bytes`, less its own pieces, which the
    simulated transport copies) over the ms per rank its exchange stream spent in copy-engine
    copies. None where the run has no such cases."""
    return _median_rate(
        gpu_work, "all_to_all_layout_copy_engine", "copy_engine_ms_per_rank",
        lambda case, u, r, heads, kv_heads: mesh_model.placed_bytes(u, r, heads, kv_heads, case["tokens"], gpu_work["head_dim"]) * (u - 1) / u,
        cases_of=lambda case: case.get("head_chunks", 1) == 1,
    )


def picks(machine: mesh_model.Machine, seed: int) -> list[dict]:
    """plan_mesh's split per mix and ring size on `machine`, every split predicted."""
    rows = []
    for mix in ("pretrain", "finetune"):
        for world in WORLD_SIZES:
            documents = [int(n) for n in lognormal_lengths(world * 8192, mix, seed=seed)]
            plan = mesh_model.plan_mesh(world, 64, 8, sum(documents), documents=documents, machine=machine, every_split=True)
            splits = {
                f"{c['ulysses']} x {c['ring']}": {"ms": c["ms"], "layout_copies_ms": c["layout_ms"], "head_chunks": c["head_chunks"]}
                for c in plan.candidates
            }
            rows.append({
                "mix": mix, "world_size": world, "pick": f"{plan.ulysses} x {plan.ring}", "pick_ms": plan.predicted_ms,
                "plain_ring_ms": splits[f"1 x {world}"]["ms"], "splits": splits,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpu_work", help="a bench/gpu_work.py JSON (.json or .json.gz) with 2-D cases")
    parser.add_argument("--seed", type=int, default=1, help="the mixes' batch")
    parser.add_argument(
        "--code", choices=mesh_model.LAYOUT_CODES, default="laid_out",
        help="what the run's code copied (mesh_model.LAYOUT_CODES; laid_out: 27070ae, as in session 28's gpu_work)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    opener = gzip.open if args.gpu_work.endswith(".gz") else open
    with opener(args.gpu_work, "rt") as f:
        gpu_work = json.load(f)
    rate, cases = fitted_rate(gpu_work, args.code)
    copy_engine_rate, copy_engine_cases = fitted_copy_engine_rate(gpu_work) if args.code == "placed" else (None, [])
    h200 = mesh_model.H200
    result = record(
        "layout_cost", "cpu", gpu_work=args.gpu_work, gpu_work_device=gpu_work["device"], gpu_work_commit=gpu_work["git_commit"],
        measured_cases=cases, run_code=args.code, fitted_gib_per_s=rate,
        copy_engine_cases=copy_engine_cases, fitted_copy_engine_gib_per_s=copy_engine_rate,
        h200_gib_per_s_assumed=h200.layout_gib_per_s, h200_copy_engine_gib_per_s=h200.local_copy_gib_per_s, seed=args.seed,
        note="plan_mesh's predictions on its H200 machine, a model",
        with_layout_copies=picks(h200, args.seed),
        with_layout_copies_at_the_h100_rate=picks(dataclasses.replace(
            h200, layout_gib_per_s=rate or h200.layout_gib_per_s, local_copy_gib_per_s=copy_engine_rate or h200.local_copy_gib_per_s,
        ), args.seed),
        without_layout_copies=picks(dataclasses.replace(h200, layout_gib_per_s=math.inf), args.seed),
        without_any_copies=picks(dataclasses.replace(h200, layout_gib_per_s=math.inf, local_copy_gib_per_s=math.inf), args.seed),
    )
    write(result, Path(args.out))
    for what, fitted, fitted_cases, assumed in (
        ("SM layout copies", rate, cases, h200.layout_gib_per_s), ("copy-engine placing", copy_engine_rate, copy_engine_cases, h200.local_copy_gib_per_s),
    ):
        if fitted is not None:
            fits = ", ".join(f"{c['case']} {c['gib_per_s']:.0f}" for c in fitted_cases)
            print(f"{what}: {fitted:.0f} GiB/s ({fits}); H200's {assumed:.0f}")
    for key in ("without_any_copies", "without_layout_copies", "with_layout_copies", "with_layout_copies_at_the_h100_rate"):
        rows = result[key]
        print(key, "; ".join(f"{r['mix']} W={r['world_size']} {r['pick']} ({r['pick_ms'] / r['plain_ring_ms']:.2f} of the ring)" for r in rows))


if __name__ == "__main__":
    main()
