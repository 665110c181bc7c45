"""What a head chunk costs the compute beyond its launches, fitted on a one-GPU replay of the 2-D
splits in head chunks (bench/magi_replay.py --head-chunks): tuning/mesh_model.Machine.chunk_fixed_ms.

For each 2-D split replayed both whole and in c chunks, the slowest ring rank's measured compute
(fwd + bwd, every kernel: ring_model.rank_step_compute) grows by some ms per chunk past the first.
The model prices each chunk's ring at its own heads, its launches in full (placement.rank_costs_ms
at h / (u c) heads, c times, against h / u heads once); what the replay shows beyond that is the
chunk's fixed cost (its fills, its partial sums, smaller launches running less well). The fit is
the median over the replayed (batch, split, chunks), with its quartiles.

    python bench/fit_chunk_cost.py REPLAY_JSON --out PATH

The placement must be the one the replay ran: run it at the replay's commit, or at one whose
balanced layout places the same documents alike.
"""

from __future__ import annotations

import argparse
import statistics

from common import load_result, record, write
from mixes import batches
from ring_model import rank_step_compute, slowest_replayed_rank_ms

from fa4_cp.plan.placement import balanced_sharding, placement_heads, slowest_rank_ms


def measured_rank_ms(split: dict) -> float:
    """A replayed split's slowest ring rank, fwd + bwd, every kernel (one chunk's ring taken c times)."""
    return slowest_replayed_rank_ms({direction: rank_step_compute(split, direction) for direction in ("forward", "backward")})


def modelled_rank_ms(lengths: list[int], ulysses: int, ring: int, q_heads: int, head_dim: int) -> float:
    """The model's slowest ring rank at `q_heads` heads (fwd + bwd): launches at any heads cost the same."""
    return sum(slowest_rank_ms(balanced_sharding(tuple(lengths), ring, placement_heads(ulysses)), q_heads, head_dim))


def chunk_rows(replay: dict) -> list[dict]:
    out = []
    for row in replay["rows"]:
        _, world, lengths = next(batches([row["mix"]], [row["world_size"]], replay["tokens_per_gpu"]))
        whole = {split["ulysses"]: split for split in row.values() if isinstance(split, dict) and split.get("head_chunks", 1) == 1 and "ranks" in split}
        for name, split in row.items():
            if not (isinstance(split, dict) and split.get("head_chunks", 1) > 1 and split["ulysses"] in whole):
                continue
            u, chunks = split["ulysses"], split["head_chunks"]
            ring, heads = world // u, replay["heads"] // u
            measured = (measured_rank_ms(split) - measured_rank_ms(whole[u])) / (chunks - 1)
            launches = (
                chunks * modelled_rank_ms(lengths, u, ring, heads // chunks, replay["head_dim"]) - modelled_rank_ms(lengths, u, ring, heads, replay["head_dim"])
            ) / (chunks - 1)
            out.append({
                "mix": row["mix"], "world_size": world, "split": name, "ulysses": u, "ring": ring, "head_chunks": chunks,
                "measured_ms_per_chunk": measured, "modelled_launches_ms_per_chunk": launches, "beyond_launches_ms": measured - launches,
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replay")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    replay = load_result(args.replay)
    rows = chunk_rows(replay)
    if not rows:
        raise SystemExit(f"{args.replay}: no 2-D split replayed both whole and in head chunks (bench/magi_replay.py --head-chunks)")
    beyond = [row["beyond_launches_ms"] for row in rows]
    quartiles = statistics.quantiles(beyond, n=4)
    result = record(
        "fit_chunk_cost", "cpu", replay=args.replay, replay_commit=replay["git_commit"], replay_device=replay["device"],
        chunk_fixed_ms=statistics.median(beyond), quartiles_ms=[quartiles[0], quartiles[2]], rows=rows,
    )
    print(f"{len(rows)} chunked splits: {result['chunk_fixed_ms']:.3f} ms a chunk beyond its launches (median; quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")
    write(result, args.out)


if __name__ == "__main__":
    main()
