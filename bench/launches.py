"""Attention launches per rank per pass of one packed-document call, from the planner: counted, not
measured (no GPU). Each planned block is one varlen kernel launch that takes every document meeting
at its step with its mask and run of lanes, so the count says how much one-launch-per-step could
still save.

    python bench/launches.py [--world-sizes 8 16 32 64 72] [--mixes pretrain finetune] [--out PATH]

8K tokens per rank, causal, the balanced layout (the 1-D ring over W ranks, and the ring of the
2-D split plan_mesh picks, 32:8 heads of 128). Per configuration: active steps, blocks per rank
(mean and max over ranks), blocks per active step, and the blocks a merge of all of a step's
blocks against one KV buffer would leave (one per step and stream read). And the forward grid of
the remote launches (tiles per KV head, summed over a rank's remote blocks, mean over ranks), as
FA4's varlen scheduler sizes it, (q rows x q heads packed + sequences x (tile - 1)) / tile:
listing every local sequence over all q rows, and over the block's computed prefix alone
(VarlenRows.computed_sequences and the block's q side), as the launches have run since
2026-12-06's session 19.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, record, today, write  # noqa: E402
from mixes import add_mix_arguments, batches  # noqa: E402

import fa4_cp  # noqa: E402
from fa4_cp.kernels import BandMask  # noqa: E402
from fa4_cp.plan.rows import rank_plan  # noqa: E402

HEADS, KV_HEADS, TOKENS_PER_RANK = 32, 8, 8192
FORWARD_TILE = 128  # FA4's Hopper forward tile rows at head_dim 128
CPU = torch.device("cpu")


def launches(lengths: list[int], ranks: int) -> dict:
    sharding = fa4_cp.Sharding.documents(lengths, ranks)
    blocks, merged, steps, grids = [], [], 0, {"every_sequence": [], "computed_prefix": []}
    for rank in range(ranks):
        plan = rank_plan(sharding, BandMask(hi=0), rank, CPU)
        steps = len(plan.steps)
        blocks.append(sum(len(step.blocks) for step in plan.steps))
        merged.append(sum(len({(block.local, block.stream) for block in step.blocks}) for step in plan.steps))
        remote = [block for step in plan.steps for block in step.blocks if not block.local]
        grids["every_sequence"].append(sum(forward_grid(sharding.local_len, len(block.varlen.seqused_q)) for block in remote))
        grids["computed_prefix"].append(sum(
            forward_grid((plan.q_sides[block.q_side] or slice(0, sharding.local_len)).stop, len(block.varlen.computed_prefix.seqused_q))
            for block in remote
        ))
    return {
        "ranks": ranks, "active_steps": steps, "blocks_per_rank_mean": statistics.mean(blocks), "blocks_per_rank_max": max(blocks),
        "blocks_per_step_mean": statistics.mean(blocks) / max(steps, 1), "one_per_step_and_stream_mean": statistics.mean(merged),
        "remote_forward_grid_tiles_per_kv_head_mean": {listing: statistics.mean(tiles) for listing, tiles in grids.items()},
    }


def forward_grid(rows: int, sequences: int) -> int:
    """Tiles per KV head of one varlen forward launch over `rows` q rows listing `sequences`."""
    return (rows * (HEADS // KV_HEADS) + sequences * (FORWARD_TILE - 1)) // FORWARD_TILE


def main() -> None:
    parser = argparse.ArgumentParser()
    add_mix_arguments(parser, [8, 16, 32, 64, 72])
    parser.add_argument("--out", default=str(RESULTS / f"cpu_{today()}" / "launches.json"))
    args = parser.parse_args()
    rows = []
    for mix, world_size, lengths in batches(args.mixes, args.world_sizes, TOKENS_PER_RANK):
        plan = fa4_cp.plan_mesh(world_size, HEADS, KV_HEADS, sum(lengths), documents=lengths)
        result = {"mix": mix, "world_size": world_size, "documents": len(lengths), "ring": launches(lengths, world_size)}
        if plan.ring > 1 and plan.ulysses > 1:
            result["split"] = {"ulysses": plan.ulysses, **launches(lengths, plan.ring)}
        rows.append(result)
        ring = result["ring"]
        print(
            f"{mix:8s} W={world_size:3d} ring: {ring['active_steps']:3d} steps, {ring['blocks_per_rank_mean']:6.2f} blocks per rank "
            f"(max {ring['blocks_per_rank_max']}), merged {ring['one_per_step_and_stream_mean']:6.2f}; remote forward grid "
            + " -> ".join(f"{tiles:.0f}" for tiles in ring["remote_forward_grid_tiles_per_kv_head_mean"].values()), flush=True,
        )
    write(record("launches", "cpu", heads=[HEADS, KV_HEADS], tokens_per_rank=TOKENS_PER_RANK, note="counted from the planner, per pass", rows=rows), args.out)


if __name__ == "__main__":
    main()
