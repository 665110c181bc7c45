"""Kernel costs fitted on a one-GPU replay of the ring (bench/magi_replay.py's JSON): each replayed
rank's plan is rebuilt from the same documents, each active step's blocks counted (tile pairs, q
tiles, KV tiles, launches), and the step's measured attention time fitted by least squares, forward
and backward apart, for a few cost forms. What tuning/kernel_cost.py would take from the ring's own
blocks, in place of upstream's one-device varlen runs. Beside them, each replayed rank's time
beside its attention kernels (fills, read-backs, the finish, copies) against its active steps: a
fixed cost per call and one per step (`beside_attention`; kernel_cost's `call_other` and
`step_other`); and each plain-ring rank's fwd + bwd time beyond its modelled attention against
whether and at how many (step, stream) pairs it has remote blocks, forward and backward
(`remote_blocks`; kernel_cost's `remote_fixed` and `remote_launch` on a replay whose `modelled_ms`
had none of them, such as one before 2026-12-06's session 16; on a later one, what the model's
own remote costs miss).

    python bench/fit_replay_costs.py REPLAY_JSON --tree CHECKOUT_OF_THE_REPLAYS_COMMIT --out PATH
    python bench/fit_replay_costs.py REPLAY_JSON --steps-of AN_EARLIER_FIT_OF_IT --out PATH
    (--without-steps: the JSON without the counted steps, which --steps-of reads)

The plan must be the one the replay ran: give `--tree` a checkout of the replay's commit
(its `git_commit`) when the planner has changed since. Tile counts: 128 x 128 tiles per sequence of
a block, a causal block's pairs up to its diagonal (shifted by its extra keys); heads as replayed.
"""

from __future__ import annotations

import argparse
import collections
import statistics

import numpy as np
import torch
from common import document_sharding, fa4_cp_from, load_result, record, write
from mixes import lognormal_lengths

FORMS = {  # cost form: the step's counts it is linear in
    "pairs": ("pairs",),
    "pairs + launches": ("pairs", "launches"),
    "pairs + q tiles + launches": ("pairs", "q_tiles", "launches"),
    "pairs + kv tiles + launches": ("pairs", "kv_tiles", "launches"),
    "pairs + kv tiles + sequences + launches": ("pairs", "kv_tiles", "sequences", "launches"),
}
# Forms anchored on one device's upstream costs (kernel_cost.ONE_DEVICE, held fixed): what the ring
# pays beyond them. A free per-pair cost trades against the per-tile one (the counts move
# together) and can fall below upstream's, which a model that sets the ring against one device
# must not do.
ANCHORED = {
    "forward": {
        "one device + q tiles + launches": ({"pairs": "forward_pair"}, ("q_tiles", "launches")),
        "one device + q tiles + sequences + launches": ({"pairs": "forward_pair"}, ("q_tiles", "sequences", "launches")),
        # every sequence a block lists, computed or not: each adds about a q tile's CTAs (every head) to FA4's varlen grid
        "one device + q tiles + listed + launches": ({"pairs": "forward_pair"}, ("q_tiles", "listed", "launches")),
    },
    "backward": {
        "one device": ({"pairs": "backward_pair", "kv_tiles": "backward_kv_tile"}, ()),
        "one device + sequences + launches": ({"pairs": "backward_pair", "kv_tiles": "backward_kv_tile"}, ("sequences", "launches")),
        "one device + listed + launches": ({"pairs": "backward_pair", "kv_tiles": "backward_kv_tile"}, ("listed", "launches")),
    },
}


def block_counts(block) -> dict[str, int]:
    """Tile pairs, q tiles, KV tiles, sequences (of some rows and keys) and the sequences it lists
    (computed or not) of one planned varlen block."""
    from fa4_cp.tuning.kernel_cost import TILE, tiles  # after fa4_cp_from: the --tree's, like the planner

    pairs = q_tiles = kv_tiles = sequences = 0
    for q_rows, kv_rows in zip(block.varlen.seqused_q.tolist(), block.varlen.seqused_k.tolist()):
        if not q_rows or not kv_rows:
            continue
        sequences += 1
        q_count, kv_count = tiles(q_rows), tiles(kv_rows)
        if block.mask.hi is None and block.mask.lo is None:
            pairs += q_count * kv_count
        else:  # causal-like: each q tile reads the KV tiles up to its last row's diagonal
            shift = kv_rows - q_rows
            pairs += sum(min(kv_count, max(0, tiles((i + 1) * TILE + shift))) for i in range(q_count))
        q_tiles, kv_tiles = q_tiles + q_count, kv_tiles + kv_count
    return {"pairs": pairs, "q_tiles": q_tiles, "kv_tiles": kv_tiles, "sequences": sequences, "listed": len(block.varlen.seqused_q)}


def replay_steps(replay: dict, fa4_cp) -> list[dict]:
    """Per replayed rank and active step: the blocks' counts and the measured attention ms."""
    from fa4_cp.kernels import BandMask
    from fa4_cp.plan.rows import rank_plan

    steps = []
    for row in replay["rows"]:
        lengths = lognormal_lengths(replay["tokens_per_gpu"] * row["world_size"], row["mix"], seed=row["world_size"])
        if len(lengths) != row["documents"]:
            raise ValueError(f"{row['mix']} W={row['world_size']}: the documents differ from the replay's")
        for split in ("chosen", "plain_ring"):
            if split not in row:
                continue
            sharding = document_sharding(fa4_cp, lengths, row[split]["ring"], row[split].get("ulysses", 1))
            for rank in row[split]["ranks"]:
                plan = rank_plan(sharding, BandMask(hi=0), rank["rank"], torch.device("cpu"))
                for step, forward, backward in zip(plan.steps, rank["forward_step_attention_ms"], rank["backward_step_attention_ms"]):
                    if bool(step.blocks) != bool(forward or backward):
                        raise ValueError(
                            f"{row['mix']} W={row['world_size']} rank {rank['rank']} step {step.step}: this planner's blocks are not "
                            f"the replay's (give --tree a checkout of {replay['git_commit']})"
                        )
                    if not step.blocks:
                        continue
                    counts = {"pairs": 0, "q_tiles": 0, "kv_tiles": 0, "sequences": 0, "listed": 0, "launches": len(step.blocks)}
                    for block in step.blocks:
                        for name, value in block_counts(block).items():
                            counts[name] += value
                    steps.append({
                        "mix": row["mix"], "world_size": row["world_size"], "split": split, "rank": rank["rank"], "step": step.step,
                        "heads": row[split]["heads_per_rank"], **counts, "forward_us": forward * 1e3, "backward_us": backward * 1e3,
                    })
    return steps


def fit(steps: list[dict], direction: str) -> dict:
    """Least-squares coefficients (us per count, per 64 heads) of each cost form, and its errors."""
    from fa4_cp.tuning.kernel_cost import ONE_DEVICE

    measured = np.array([s[f"{direction}_us"] for s in steps])

    def counts(columns) -> np.ndarray:  # tiles and sequences count per 64 heads, as kernel_cost.py counts them; a launch is a launch
        return np.array([[s[c] * s["heads"] / 64 if c != "launches" else s[c] for c in columns] for s in steps], dtype=float)

    forms = {name: ({}, columns) for name, columns in FORMS.items()}
    forms.update({name: ({c: getattr(ONE_DEVICE, field) for c, field in fixed.items()}, free) for name, (fixed, free) in ANCHORED[direction].items()})
    forms = {name: form for name, form in forms.items() if all(c in steps[0] for c in (*form[0], *form[1]))}  # an earlier fit's steps: no sequences
    fits = {}
    for name, (fixed, free) in forms.items():
        anchored = counts(fixed) @ np.array(list(fixed.values()), dtype=float)  # zeros where nothing is held fixed
        free_counts = counts(free)
        coefficients = np.linalg.lstsq(free_counts, measured - anchored, rcond=None)[0] if free else np.zeros(0)
        modelled = anchored + free_counts @ coefficients
        relative = np.abs(modelled - measured) / measured
        fits[name] = {
            "us_per": {**fixed, **dict(zip(free, (float(c) for c in coefficients)))}, "held_fixed": sorted(fixed),
            "median_relative_error": float(np.median(relative)), "max_relative_error": float(relative.max()),
            "mean_signed_error": float(np.mean((modelled - measured) / measured)),
        }
    return fits


def fit_beside_attention(replay: dict) -> dict:
    """Least squares over every replayed rank: its time beside attention (us, forward, backward and
    both) against a cost per call and one per active step. Every rank of a replay at a fixed number
    of tokens per GPU holds the same tokens x heads, so the per-call cost is at that shape."""
    ranks = [rank for row in replay["rows"] for split in ("chosen", "plain_ring") if split in row for rank in row[split]["ranks"]]
    design = np.array([[1.0, len(rank["steps"])] for rank in ranks])
    fits = {}
    for direction in ("forward", "backward", "both"):
        parts = ("forward", "backward") if direction == "both" else (direction,)
        measured = np.array([sum(rank[f"{part}_ms"] - rank[f"{part}_attention_ms"] for part in parts) * 1e3 for rank in ranks])
        (per_call, per_step) = np.linalg.lstsq(design, measured, rcond=None)[0]
        relative = np.abs(design @ np.array([per_call, per_step]) - measured) / measured
        fits[direction] = {
            "call_us": float(per_call), "step_us": float(per_step), "median_relative_error": float(np.median(relative)),
            "max_relative_error": float(relative.max()),
        }
    return {"ranks": len(ranks), "tokens_per_gpu": replay["tokens_per_gpu"], "heads": replay["heads"], "head_dim": replay["head_dim"], "fits": fits}


def fit_remote_blocks(replay: dict, fa4_cp) -> dict:
    """Per mix, least squares over the plain rings' replayed ranks: each rank's fwd + bwd time
    beyond the replay's modelled attention (`modelled_ms`) against a constant per ring size (what
    the model misses alike on every rank of one replay), whether the rank has blocks against
    another rank's KV, and at how many (step, stream) pairs (its plan's remote launches):
    kernel_cost's `remote_fixed` and `remote_launch` (less what `modelled_ms` charged for them,
    where it did). Beside it, a constant per ring size alone."""
    from fa4_cp.kernels import BandMask
    from fa4_cp.plan.rows import rank_plan

    ranks = collections.defaultdict(list)
    for row in replay["rows"]:
        lengths = lognormal_lengths(replay["tokens_per_gpu"] * row["world_size"], row["mix"], seed=row["world_size"])
        for split in ("chosen", "plain_ring"):
            if split not in row or row[split]["ulysses"] != 1:
                continue
            sharding = fa4_cp.Sharding.documents(lengths, row[split]["ring"])
            for rank in row[split]["ranks"]:
                plan = rank_plan(sharding, BandMask(hi=0), rank["rank"], torch.device("cpu"))
                launches = len({(step.step, block.stream) for step in plan.steps for block in step.blocks if not block.local})
                measured, modelled = (rank["forward_ms"], rank["backward_ms"]), rank["modelled_ms"]
                ranks[row["mix"]].append((row["world_size"], launches, *(m * 1e3 for m in measured), *(c * 1e3 for c in modelled)))
    fits = {}
    for mix, rows in ranks.items():
        world, launches, forward, backward, modelled_forward, modelled_backward = (np.array(column, dtype=float) for column in zip(*rows))
        sizes = sorted(set(world))
        per_size = np.stack([world == size for size in sizes], axis=1).astype(float)
        design = np.concatenate([per_size, np.stack([launches > 0, launches], axis=1)], axis=1)
        fits[mix] = {"ranks": len(rows), "ranks_with_remote_blocks": int((launches > 0).sum()), "world_sizes": [int(size) for size in sizes]}
        for direction, measured, modelled in (
            ("forward", forward, modelled_forward), ("backward", backward, modelled_backward),
            ("both", forward + backward, modelled_forward + modelled_backward),
        ):
            beyond = measured - modelled
            # where every rank has remote blocks, the fixed cost and the constants cannot be told apart: lstsq's
            # least-norm answer splits them, so only the per-launch cost means anything there
            coefficients = np.linalg.lstsq(design, beyond, rcond=None)[0]
            constants = np.linalg.lstsq(per_size, beyond, rcond=None)[0]
            fits[mix][direction] = {
                "us": {
                    "constant_per_world_size": [float(c) for c in coefficients[: len(sizes)]],
                    "remote_fixed": float(coefficients[-2]), "remote_launch": float(coefficients[-1]),
                },
                "median_relative_error": float(np.median(np.abs(design @ coefficients - beyond) / measured)),
                "constants_alone_median_relative_error": float(np.median(np.abs(per_size @ constants - beyond) / measured)),
            }
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("replay")
    parser.add_argument("--tree", help="a checkout of the replay's commit, whose planner rebuilds its plans")
    parser.add_argument("--steps-of", help="an earlier fit's JSON of this replay: its counted steps, not the plans rebuilt")
    parser.add_argument("--without-steps", action="store_true", help="leave the counted steps out of the JSON (they are most of it)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fa4_cp = fa4_cp_from(args.tree)
    replay = load_result(args.replay)
    if args.steps_of:  # an earlier fit's counted steps: their plans need no --tree again
        steps = load_result(args.steps_of)["data"]
    else:
        steps = replay_steps(replay, fa4_cp)
    fits = {direction: fit(steps, direction) for direction in ("forward", "backward")}
    beside = fit_beside_attention(replay)
    remote = fit_remote_blocks(replay, fa4_cp)
    for direction, forms in fits.items():
        for name, result in forms.items():
            coefficients = ", ".join(f"{value:.3f} us per {count}" for count, value in result["us_per"].items())
            print(f"{direction:8} {name:28} {coefficients}; median error {result['median_relative_error']:.3f}, max {result['max_relative_error']:.3f}")
    for direction, result in beside["fits"].items():
        print(f"{direction:8} beside attention: {result['call_us']:.1f} us per call + {result['step_us']:.1f} per step; "
              f"median error {result['median_relative_error']:.3f}, max {result['max_relative_error']:.3f}")
    for mix, result in remote.items():
        for direction in ("forward", "backward", "both"):
            part = result[direction]
            us = part["us"]
            print(f"{mix:8} {direction:8} remote blocks beyond the model: fixed {us['remote_fixed']:.1f} us, per launch {us['remote_launch']:.1f} us"
                  f"; median error {part['median_relative_error']:.3f} (constants per ring size alone {part['constants_alone_median_relative_error']:.3f})")
    write(record(
        "fit_replay_costs", "cpu", replay=args.replay, replay_device=replay["device"], replay_commit=replay["git_commit"],
        planner_tree=args.tree, steps_of=args.steps_of, steps=len(steps), median_step_us={d: statistics.median(s[f"{d}_us"] for s in steps) for d in ("forward", "backward")},
        method="least squares over each replayed rank's active steps: measured attention us of the step against its blocks' counts; "
        "pairs and tiles per 64 heads, launches as they are",
        fits=fits, beside_attention=beside, remote_blocks=remote, **({} if args.without_steps else {"data": steps}),
    ), args.out)


if __name__ == "__main__":
    main()
