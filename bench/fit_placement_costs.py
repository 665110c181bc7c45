"""What a ring rank's remote launches cost, fitted on bench/placement_replay.py's JSON: every
candidate placement's ring ranks, replayed alone at the heads a ring rank holds (32 of a 1-D ring,
4 of an 8 x 8 split), each rank's measured forward and backward against its plan.

Per rank: the measured ms, less its tiles' modelled cost (kernel_cost.span_us at its heads), less
the fixed cost of having remote blocks (kernel_cost's `remote_fixed`, scaled by heads: fills, the
read-back and the finish move heads x rows), less the ring's steps' work beside attention
(`step_other` per step of the plan, not scaled: launches and gaps), is fitted by least squares
against the rank's (step, stream) pairs of remote blocks (`placement.remote_reach`) with a
constant per case (each case's per-call work, which every candidate of a batch shares). Fitted
per launch as it is, and per launch per 64 heads, to show which the replay supports. Then, for
each case, which candidate the model with the fitted costs picks, at the heads its ring rank
holds and at those the layout prices (`placement.placement_heads`), against the fastest measured.

    python bench/fit_placement_costs.py PLACEMENT_REPLAY_JSON --out PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_result, record, write  # noqa: E402
from mixes import lognormal_lengths  # noqa: E402
from placement_replay import CASES, plan_counts  # noqa: E402

from fa4_cp.plan.placement import placement_candidates, placement_heads, rank_costs_ms, remote_reach  # noqa: E402
from fa4_cp.tuning.kernel_cost import CALIBRATED_HEADS, RING, remote_us  # noqa: E402

DIRECTIONS = ("forward", "backward")


def candidates_of(row: dict) -> list:
    """The row's distinct candidate placements, rebuilt by this planner and checked against the replay's plans."""
    mix, tokens, world, ulysses = CASES[row["case"]]
    lengths = lognormal_lengths(row.get("tokens", tokens), mix)  # a dry run's: 64 per GPU (session 18's JSON had no tokens)
    seen, placements = set(), []
    for _, sharding in placement_candidates(tuple(lengths), world // ulysses):
        if sharding.spans not in seen:
            seen.add(sharding.spans)
            placements.append(sharding)
    replayed = [candidate["plans"] for candidate in row["candidates"]]
    if [plan_counts(sharding) for sharding in placements] != replayed:
        raise ValueError(f"{row['case']}: this planner's candidates are not the replay's (run it at the replay's commit)")
    return placements


def rank_rows(sharding, heads: int, head_dim: int) -> list[dict]:
    """Per ring rank: its tiles' modelled us (forward, backward), its remote (step, stream) pairs, its plan's steps."""
    forward_reach, backward_reach = remote_reach(sharding.spans, sharding.world_size)
    launches = forward_reach + backward_reach
    # the layout's own rank costs, less what they charge the remote blocks beside their tiles
    tiles = np.array(rank_costs_ms(sharding, heads, head_dim)) * 1e3 - np.stack(remote_us(launches, heads, head_dim), axis=1)
    steps = max(ranks for _, ranks in sharding.spans)
    return [{"tiles_us": tiles[rank], "remote_launches": int(launches[rank]), "steps": steps} for rank in range(sharding.world_size)]


def fit(rows: list[dict], per_64_heads: bool, step_other: float) -> tuple[dict, list[dict]]:
    """us per remote launch (forward, backward), per-case constants and the errors."""
    cases = sorted({r["case"] for r in rows})
    scale = np.array([r["heads"] / CALIBRATED_HEADS for r in rows])
    launches = np.array([r["remote_launches"] for r in rows], dtype=float) * (scale if per_64_heads else 1.0)
    design = np.column_stack([launches] + [[float(r["case"] == case) for r in rows] for case in cases])
    result, modelled = {}, {}
    for index, direction in enumerate(DIRECTIONS):
        measured = np.array([r[f"{direction}_us"] for r in rows])
        known = np.array([
            r["tiles_us"][index] + r["heads"] / CALIBRATED_HEADS * RING.remote_fixed[index] * (r["remote_launches"] > 0)
            + step_other / 2 * r["steps"] for r in rows
        ])
        coefficients = np.linalg.lstsq(design, measured - known, rcond=None)[0]
        modelled[direction] = known + design @ coefficients
        relative = np.abs(modelled[direction] - measured) / measured
        result[direction] = {
            "us_per_remote_launch": float(coefficients[0]), "case_constant_us": dict(zip(cases, (float(c) for c in coefficients[1:]))),
            "median_relative_error": float(np.median(relative)), "max_relative_error": float(relative.max()),
        }
    return result, [dict(r, **{f"modelled_{d}_us": float(modelled[d][i]) for d in DIRECTIONS}) for i, r in enumerate(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("replay")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    replay = load_result(args.replay)
    rows, placements = [], {}
    for row in replay["rows"]:
        placements[row["case"]] = candidates_of(row)
        for index, (sharding, candidate) in enumerate(zip(placements[row["case"]], row["candidates"])):
            measured = candidate["measured"]
            for rank, counts in enumerate(rank_rows(sharding, row["heads_per_rank"], replay["head_dim"])):
                rows.append({
                    "case": row["case"], "candidate": index, "rank": rank, "heads": row["heads_per_rank"], **counts,
                    **{f"{d}_us": measured[d]["per_rank_ms"][rank] * 1e3 for d in DIRECTIONS},
                })
    step_other = RING.step_other
    fits = {}
    fits["per launch per 64 heads"], _ = fit(rows, True, step_other)
    fits["per launch"], modelled = fit(rows, False, step_other)  # the form kernel_cost takes
    picks = choices(replay, placements, fits["per launch"], step_other)
    for name, result in fits.items():
        print(f"{name:24} " + "; ".join(
            f"{d} {result[d]['us_per_remote_launch']:.1f} us, median error {result[d]['median_relative_error']:.3f}" for d in DIRECTIONS
        ))
    for pick in picks:
        print(f"{pick['case']:18} fastest measured #{pick['fastest']}; the fitted model picks #{pick['at_rank_heads']} at the ring rank's "
              f"{pick['rank_heads']} heads, #{pick['at_priced_heads']} at the layout's {pick['priced_heads']}; the replayed layout chose #{pick['chosen']}")
    write(record(
        "fit_placement_costs", "cpu", replay=args.replay, replay_device=replay["device"], replay_commit=replay["git_commit"],
        method="least squares over every candidate's replayed ring ranks: measured ms less the tiles' modelled cost, the scaled "
        "remote_fixed and step_other per plan step, against the rank's remote (step, stream) pairs and a constant per case",
        step_other_us=step_other, fits=fits, picks=picks,
        ranks=[{k: (list(v) if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in modelled],
    ), args.out)


def choices(replay: dict, placements: dict, fitted: dict, step_other: float) -> list[dict]:
    """Per case: the measured fastest candidate, and the one the model with the fitted launch cost picks (its
    slowest rank, forward + backward, and step_other per step of the widest span)."""
    costs = dataclasses.replace(RING, remote_launch=tuple(fitted[d]["us_per_remote_launch"] for d in DIRECTIONS))
    picks = []
    for row in replay["rows"]:
        measured = [candidate["measured"]["both"]["slowest_ms"] for candidate in row["candidates"]]

        def pick(heads: int) -> int:
            modelled = []
            for sharding in placements[row["case"]]:
                ranks = rank_rows(sharding, heads, replay["head_dim"])
                scale = heads / CALIBRATED_HEADS
                slowest = max(
                    sum(r["tiles_us"][i] + scale * costs.remote_fixed[i] * (r["remote_launches"] > 0) + costs.remote_launch[i] * r["remote_launches"]
                        for i in range(2)) for r in ranks
                )
                modelled.append(slowest + step_other * ranks[0]["steps"])
            return int(np.argmin(modelled))

        priced = placement_heads(row["ulysses"])
        picks.append({
            "case": row["case"], "fastest": int(np.argmin(measured)), "chosen": row["chosen_index"], "rank_heads": row["heads_per_rank"],
            "at_rank_heads": pick(row["heads_per_rank"]), "priced_heads": priced, "at_priced_heads": pick(priced),
            "measured_slowest_ms": measured,
        })
    return picks


if __name__ == "__main__":
    main()
