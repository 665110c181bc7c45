"""KV bytes each rank receives per pass of one packed-document attention call: the 1-D ring as
it runs, as it ran before KV travelled only where needed, the 2-D split that fa4_cp.plan_mesh
picks, and the minimum the mask needs. From the planner, without a GPU: counted, not measured.

    python bench/kv_bytes.py [--world-sizes 8 16 32 64 72] [--mixes pretrain finetune] [--out PATH]

8K tokens per rank, 32:8 heads of 128, causal, bf16 K/V (fp32 dK/dV back in the backward).
- ring: the balanced layout's two streams, each hop carrying only the rows that the rank it goes
  to or a later one reads (plan/span_rows.py);
- whole-buffer ring (before): a one-way ring whose every hop carried the whole travelling buffer
  (the longest travelling rows of any rank) at steps 1..g-1 and W-g+1..W-1 of the widest span g;
- minimum: each rank receives only the chunks of its spread documents' other span ranks that
  its own chunks see (zigzag within a span: rank i sees one chunk of j < i, both chunks of j > i);
- 2-D: the split's ring over its r ranks (its own streams and heads) plus what each rank
  receives in the Ulysses all-to-alls (q, k, v and out forward; dout, dq, dk and dv backward).
The slowest rank is reported (max over ranks). The backward moves K/V again plus fp32 dK/dV
(the ring: its dK/dV chains as planned; the others: as many dK/dV rows as K/V rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, record, today, write  # noqa: E402
from mixes import add_mix_arguments, batches  # noqa: E402

import fa4_cp  # noqa: E402
from fa4_cp.kernels import BandMask  # noqa: E402
from fa4_cp.plan.placement import balanced_sharding  # noqa: E402
from fa4_cp.plan.schedule import band_interval  # noqa: E402
from fa4_cp.plan.span_rows import span_streams  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, TOKENS_PER_RANK = 32, 8, 128, 8192
MIB = 2**20


def kv_row_bytes(kv_heads: int, backward: bool) -> int:
    """K and V of one token (16-bit), and in the backward also its fp32 dK and dV."""
    return 2 * kv_heads * HEAD_DIM * (2 + (4 if backward else 0))


def ring_backward_bytes(lengths: list[int], ranks: int, kv_heads: int) -> int:
    """Bytes the ring as it runs brings the slowest rank in a backward: K/V again, and the dK/dV
    chains, counted from its plan (a chain shrinks with its KV; what leaves it goes home)."""
    streams = span_streams(balanced_sharding(tuple(lengths), ranks), band_interval(BandMask(hi=0)))
    per_kv, per_dkv = kv_row_bytes(kv_heads, False), kv_row_bytes(kv_heads, True) - kv_row_bytes(kv_heads, False)
    return max(streams.received_rows(rank) * per_kv + streams.received_dkv_rows(rank) * per_dkv for rank in range(ranks))


def ring_rows(lengths: list[int], ranks: int) -> tuple[int, int, int]:
    """(rows received per rank by the ring as it runs, by the whole-buffer ring before, the
    minimum rows the mask needs), each the max over ranks."""
    sharding = balanced_sharding(tuple(lengths), ranks)
    streams = span_streams(sharding, band_interval(BandMask(hi=0)))
    widest = max(span for _, span in sharding.spans)
    hops = min(ranks - 1, 2 * (widest - 1))
    travelling = [0] * ranks
    for doc, (first, span) in enumerate(sharding.spans):
        for index in range(span if span > 1 else 0):
            travelling[(first + index) % ranks] += 2 * sharding.chunk_size(doc)
    received = max(streams.received_rows(rank) for rank in range(ranks))
    return received, hops * max(travelling), max(sharding.causal_kv_rows)


def row(lengths: list[int], world_size: int) -> dict:
    ring_received, whole_buffer_received, minimum = ring_rows(lengths, world_size)
    plan = fa4_cp.plan_mesh(world_size, HEADS, KV_HEADS, sum(lengths), documents=lengths)
    u, r = plan.ulysses, plan.ring
    mesh_ring = ring_rows(lengths, r)[0] if r > 1 else 0
    kv_local = max(KV_HEADS // u, 1)
    local = sum(lengths) / world_size
    # forward: q, k and v to heads, out back; backward: dout to heads, dq, dk and dv back (16-bit);
    # KV heads fewer than u travel repeated to u
    all_to_all = local * (u - 1) / u * HEAD_DIM * 2 * (2 * HEADS + 2 * max(KV_HEADS, u))
    result = {"world_size": world_size, "documents": len(lengths), "split": [u, r]}
    for direction, backward in (("forward", False), ("backward", True)):
        per_row, per_row_mesh = kv_row_bytes(KV_HEADS, backward), kv_row_bytes(kv_local, backward)
        result[direction] = {
            "ring_mib": (ring_backward_bytes(lengths, world_size, KV_HEADS) if backward else ring_received * per_row) / MIB,
            "whole_buffer_ring_mib": whole_buffer_received * per_row / MIB,
            "minimum_mib": minimum * per_row / MIB,
            "mesh_ring_mib": (ring_backward_bytes(lengths, r, kv_local) if backward and r > 1 else mesh_ring * per_row_mesh) / MIB,
            "mesh_all_to_all_mib": all_to_all / MIB,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    add_mix_arguments(parser, [8, 16, 32, 64, 72])
    parser.add_argument("--out", default=str(RESULTS / f"cpu_{today()}" / "kv_bytes.json"))
    args = parser.parse_args()
    rows = []
    for mix, world_size, lengths in batches(args.mixes, args.world_sizes, TOKENS_PER_RANK):
        result = {"mix": mix, **row(lengths, world_size)}
        rows.append(result)
        f, b = result["forward"], result["backward"]
        print(
            f"{mix:8s} W={world_size:3d} {result['split'][0]:2d}x{result['split'][1]:<2d} fwd MiB: ring {f['ring_mib']:7.1f} "
            f"(whole buffer {f['whole_buffer_ring_mib']:7.1f}) "
            f"min {f['minimum_mib']:6.1f} 2-D {f['mesh_ring_mib']:6.1f}+{f['mesh_all_to_all_mib']:5.1f} | bwd ring "
            f"{b['ring_mib']:7.1f} min {b['minimum_mib']:6.1f} 2-D {b['mesh_ring_mib']:6.1f}+{b['mesh_all_to_all_mib']:5.1f}", flush=True,
        )
    write(record(
        "kv_bytes", "cpu", heads=[HEADS, KV_HEADS], head_dim=HEAD_DIM, tokens_per_rank=TOKENS_PER_RANK,
        note="counted from the planner (no GPU): received per rank per pass, slowest rank", rows=rows,
    ), args.out)


if __name__ == "__main__":
    main()
