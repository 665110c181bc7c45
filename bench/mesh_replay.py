"""One GPU's check of plan_mesh's compute side: a rank of each Ulysses x ring split replayed with
the real kernels and no transfers (bench/replay.py), against the model's compute plus per-step
overhead (its prediction with the hops and all-to-alls left out, which one GPU cannot measure).

A rank of a u x r mesh runs the ring of r ranks on its h / u heads (KV heads repeated to u where
fewer) over the r-way share of the sequence, u times the tokens of a rank of the plain ring.
Dense causal zigzag sequences, rank 0, forward + backward, CUDA events, median of 3 (GPU time:
the launches queued behind a sleep kernel, bench/replay.py).

    python bench/mesh_replay.py --out bench/results/<device>_<date>/mesh_replay.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import record, write  # noqa: E402
from fa4_cp import Sharding, plan_mesh  # noqa: E402
from fa4_cp.kernels import BandMask, get_backend  # noqa: E402
from fa4_cp.tuning.mesh_model import H200  # noqa: E402
from replay import replay_rank  # noqa: E402

CAUSAL = BandMask(hi=0)


def replay_split(candidate: dict, world_size: int, per_gpu: int, heads: int, kv_heads: int, head_dim: int, backend) -> dict:
    u, r = candidate["ulysses"], candidate["ring"]
    sharding = Sharding.dense(world_size * per_gpu, r, "zigzag")
    measured = replay_rank(sharding, CAUSAL, 0, heads // u, max(kv_heads // u, 1), head_dim, backend)
    measured_ms = measured["forward_ms"] + measured["backward_ms"]
    predicted_ms = candidate["compute_ms"] + candidate["active_steps"] * H200.step_overhead_ms + candidate["call_ms"]
    return {
        "ulysses": u, "ring": r, "measured_ms": measured_ms, "forward_ms": measured["forward_ms"], "backward_ms": measured["backward_ms"],
        "attention_ms": measured["forward_attention_ms"] + measured["backward_attention_ms"],
        "predicted_without_transfers_ms": predicted_ms, "predicted_over_measured": predicted_ms / measured_ms,
        "predicted_with_transfers_ms": candidate["ms"], "predicted_efficiency": candidate["efficiency"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 72])
    parser.add_argument("--per-gpu", type=int, nargs="+", default=[2048, 8192], help="tokens per GPU")
    parser.add_argument("--heads", default="32:8", help="q:kv heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting configurations after this")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    heads, kv_heads = (int(n) for n in args.heads.split(":"))
    backend = get_backend("fa4", torch.empty(1, 1, 1, args.head_dim, device="cuda", dtype=torch.bfloat16))
    began, rows = time.monotonic(), []
    for world_size in args.world_sizes:
        for per_gpu in args.per_gpu:
            if args.max_minutes is not None and time.monotonic() - began > 60 * args.max_minutes:
                break
            plan = plan_mesh(world_size, heads, kv_heads, world_size * per_gpu, head_dim=args.head_dim)
            splits = [replay_split(c, world_size, per_gpu, heads, kv_heads, args.head_dim, backend) for c in plan.candidates]
            plain = next(s for s in splits if s["ulysses"] == 1)
            for split in splits:
                split["measured_speedup_over_plain_ring"] = plain["measured_ms"] / split["measured_ms"]
                split["predicted_speedup_over_plain_ring"] = plain["predicted_without_transfers_ms"] / split["predicted_without_transfers_ms"]
            rows.append({"world_size": world_size, "per_gpu": per_gpu, "planned": [plan.ulysses, plan.ring], "splits": splits})
            for s in splits:
                print(
                    f"W={world_size:3d} {per_gpu:5d}/GPU {s['ulysses']}x{s['ring']:<3d} measured {s['measured_ms']:8.3f} ms "
                    f"(attention {s['attention_ms']:8.3f})  model {s['predicted_without_transfers_ms']:8.3f} ms  "
                    f"model/measured {s['predicted_over_measured']:.2f}  speedup measured {s['measured_speedup_over_plain_ring']:.2f} "
                    f"model {s['predicted_speedup_over_plain_ring']:.2f}",
                    flush=True,
                )
    result = record("mesh_replay", "cuda", heads=args.heads, head_dim=args.head_dim, machine_model=H200.name, configurations=rows)
    write(result, args.out)


if __name__ == "__main__":
    main()
