"""The ring's time from measured parts, validated on the committed multi-GPU runs, then predicted.

    python bench/ring_model.py [--replay-dense J] [--replay-packed J] [--out-dir DIR]
    python bench/ring_model.py --replay-magi MAGI_REPLAY_JSON... --out PATH

The second form takes bench/magi_replay.py runs (every ring rank of a split replayed alone, at the
W it ran) and adds their transfers: `replayed_splits`, whose ranks run their own steps as their KV
arrives (`ring_timeline_ms`) rather than in lock-step as below.

One call's time = the cross-rank check's cost + the sum over active ring steps of
max(the slowest rank's compute at that step, the step's hop: latency + bytes / bandwidth); the
backward's hops carry KV and dK/dV, and its last dK/dV hop home follows the last step. Parts, all
measured (bench/results):
- compute: the one-GPU replay (bench/varlen.py): each rank's attention kernels per step, plus its
  other kernels spread evenly over its steps. The replay runs the real executor, so its time holds
  the host's own gaps (lead-in, launches) too; only communication is left out;
- link: the copy-engine hop of transport_bandwidth_w2.json (16, 64, 256 MiB; two-way signalling
  included), fitted as latency + bytes / bandwidth;
- the cross-rank check per forward call: 0.13 ms at W = 2 (consistency_check_cuda_2026-11-21.json,
  with against without), 0.57 ms at W = 4 (ring_w4.json with it against the profile's run
  without, ring_w4_8k_nocheck_profile.json), and that at W >= 4 (an all-gather grows slowly).
Validation: every dense causal row of ring_w2.json, ring_w4.json and ring_w4_128k.json
(copy-engine transport), predicted against measured. Predictions: W = 8 to 72, dense (8K and
32K per GPU, 32:8 heads; one GPU over the whole sequence from ring_w4.json's, grown as the
length squared) and packed (the replayed mixes, against upstream FA4 varlen on one device), on
H200 and on GB200 NVL72, whose
figures are ASSUMED (not measured here): compute 989 / 2250 of the H200's (dense bf16 peaks),
NVLink 5 at twice the H200 hop bandwidth, the same latency and fixed costs. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_result as load, record, write  # noqa: E402

H200_RUNS = RESULTS / "ring_nvidia_h200_2026-11-21"
DAY = RESULTS / "nvidia_h200_2026-12-01"
PREDICT_WORLD_SIZES = (8, 16, 24, 32, 48, 64, 72)
H200 = {"compute_scale": 1.0, "bandwidth_scale": 1.0, "assumed": False}
GB200 = {"compute_scale": 989.4 / 2250.0, "bandwidth_scale": 2.0, "assumed": True}


def fit_link(transport: dict) -> dict:
    """Least squares of hop ms against bytes for the copy engine."""
    points = [(r["mib"] * 2**20, r["ms"]) for r in transport["results"] if r["transport"] == "copy_engine"]
    mean_x = statistics.mean(x for x, _ in points)
    mean_y = statistics.mean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return {"latency_ms": mean_y - slope * mean_x, "ms_per_byte": slope, "gib_per_s": 1e3 / slope / 2**30}


def check_costs(two_gpus: dict, profile: dict, with_check: dict) -> dict[int, float]:
    """ms of the cross-rank check per call, by ring size (W >= 4 takes W = 4's)."""
    config = profile["profile"]["config"]
    on = next(r for r in with_check["results"] if (r["heads"], r["kv_heads"], r["seq_per_gpu"], r["mode"]) == (32, 8, config["seq_per_gpu"], "fwdbwd"))
    w4 = on["ms"]["ours_copy_engine"] - profile["results"][0]["ms"]["ours_copy_engine"]
    w2 = (two_gpus["ring_call_with_check_s"] - two_gpus["ring_call_without_check_s"]) * 1e3
    return {2: w2, 4: w4}


def check_ms(checks: dict[int, float], world_size: int) -> float:
    return checks[2] if world_size <= 2 else checks[4]


def step_compute(row: dict, direction: str, compute_scale: float = 1.0) -> list[float]:
    """The slowest rank's compute at each active step (ms)."""
    return [max(column) for column in zip(*rank_step_compute(row, direction, compute_scale))]


def ring_ms(compute: dict[str, list[float]], hop: dict[str, float], link: dict, check: float, bandwidth_scale: float = 1.0) -> dict:
    """Forward and forward+backward ms of a call from its per-step compute, hop bytes and the
    check's cost."""

    def hop_ms(nbytes: float) -> float:
        return link["latency_ms"] + nbytes * link["ms_per_byte"] / bandwidth_scale if nbytes else 0.0

    forward, steps = check, len(compute["forward"])
    for index, c in enumerate(compute["forward"]):
        forward += max(c, hop_ms(hop["kv"]) if index + 1 < steps else 0.0)
    backward = 0.0
    for index, c in enumerate(compute["backward"]):
        following = hop_ms(hop["kv"]) if index + 1 < steps else 0.0
        backward += max(c, following + hop_ms(hop["dkv"]))
    backward += hop_ms(hop["dkv"]) if steps > 1 else 0.0  # the last partial sums' hop home
    return {"fwd": forward, "fwdbwd": forward + backward}


def ring_timeline_ms(per_rank: list[list[float]], hop_ms: float, trailing_ms: float = 0.0, ahead: int = 1) -> float:
    """When the last rank finishes a pass whose ranks each run their own steps (per_rank[r][s], ms,
    compute) as soon as the step's KV is held, not in lock-step. The KV of step s comes from the
    neighbours on both sides (the balanced layout's two streams; for the dense ring's one stream
    the same bound) a hop after it can move: the sender holds it (received for step s - 1), the
    hop before it on the copy engine has landed, and on both ranks the buffer it lands in is free,
    which with `ahead` + 1 buffers a stream (runtime/travelling.py: hops up to `ahead` steps ahead
    of the compute) is once each has finished step s - 1 - `ahead`. `trailing_ms`: a last hop
    after a rank's last step (the backward's partial sums going home)."""
    world, steps = len(per_rank), len(per_rank[0])
    arrival = [[0.0] * steps for _ in range(world)]
    finish = [[0.0] * steps for _ in range(world)]
    for step in range(steps):
        for rank in range(world):
            if step:
                both = (rank, (rank - 1) % world, (rank + 1) % world)
                freed = max(finish[r][step - 1 - ahead] for r in both) if step - 1 - ahead >= 0 else 0.0
                arrival[rank][step] = max(freed, *(arrival[r][step - 1] for r in both)) + hop_ms
            began = max(finish[rank][step - 1] if step else 0.0, arrival[rank][step])
            finish[rank][step] = began + per_rank[rank][step]
    return max(row[-1] for row in finish) + (trailing_ms if steps > 1 else 0.0)


def timeline_ms(compute: dict[str, list[list[float]]], hop_bytes: dict[str, float], link: dict, check: float, ahead: int,
                bandwidth_scale: float = 1.0) -> dict:
    """Forward and forward+backward ms of a replayed call by `ring_timeline_ms`; `compute`: per
    direction, each rank's compute per step (`rank_step_compute`)."""

    def hop(nbytes: float) -> float:
        return link["latency_ms"] + nbytes * link["ms_per_byte"] / bandwidth_scale

    forward = check + ring_timeline_ms(compute["forward"], hop(hop_bytes["kv"]), ahead=ahead)
    backward = ring_timeline_ms(compute["backward"], hop(hop_bytes["kv"] + hop_bytes["dkv"]), hop(hop_bytes["dkv"]), ahead=ahead)
    return {"fwd": forward, "fwdbwd": forward + backward}


def rank_step_compute(row: dict, direction: str, compute_scale: float = 1.0) -> list[list[float]]:
    """Each rank's compute per active step (ms): its attention kernels, and its other kernels
    spread evenly over its steps."""
    per_rank = []
    for rank in row["ranks"]:
        attention = rank[f"{direction}_step_attention_ms"]
        other = (rank[f"{direction}_ms"] - sum(attention)) / len(attention)
        per_rank.append([(a + other) * compute_scale for a in attention])
    return per_rank


SAVED_LAUNCH_MS = {"forward": 0.0209, "backward": 0.0401}
"""What a remote launch costs a plain-ring rank beyond its tiles (ms), refitted on session 26's
H100 replay: kernel_cost.RING.remote_launch less what the fit found it over-charges on the
fine-tuning-like rings (bench/results/cpu_2026-12-07/fit_replay_costs_s26.json, `remote_blocks`)."""


def one_remote_launch_compute(row: dict, direction: str, compute_scale: float = 1.0, one_hop: bool = False) -> list[list[float]]:
    """A what-if for issue 27's sparse gather, a model, not a run: `rank_step_compute` with each
    rank's blocks against other ranks' KV in one launch at its last active step, their replayed
    times summed less SAVED_LAUNCH_MS for every launch saved (one per active remote step: a step
    whose blocks came in two launches, one a stream, saves one more, not counted). The KV still
    travels as the ring's streams carry it; with `one_hop`, every rank's remote KV arrives as one
    step's would (two steps a rank, the work beside attention spread over them): a bound for a
    gather as fast as one hop."""
    per_rank = []
    for rank in row["ranks"]:
        attention = rank[f"{direction}_step_attention_ms"]
        remote = [step for step in range(1, len(attention)) if attention[step] > 0]
        merged = max(sum(attention[step] for step in remote) - SAVED_LAUNCH_MS[direction] * (len(remote) - 1), 0.0) if remote else 0.0
        steps = [attention[0], merged] if one_hop else [attention[0]] + [0.0] * (len(attention) - 1)
        if remote and not one_hop:
            steps[remote[-1]] = merged
        other = (rank[f"{direction}_ms"] - sum(attention)) / len(steps)
        per_rank.append([(a + other) * compute_scale for a in steps])
    return per_rank


def slowest_replayed_rank_ms(compute: dict[str, list[list[float]]]) -> float:
    """The rank whose steps take longest, forward and backward together (`rank_step_compute` per direction)."""
    return max(sum(f) + sum(b) for f, b in zip(compute["forward"], compute["backward"]))


def replay_inputs(row: dict, compute_scale: float = 1.0) -> tuple[dict, dict]:
    compute = {direction: step_compute(row, direction, compute_scale) for direction in ("forward", "backward")}
    return compute, {"kv": row["kv_hop_bytes"], "dkv": row["dkv_hop_bytes"]}


def validate(dense: list[dict], link: dict, checks: dict[int, float]) -> list[dict]:
    rows = []
    for path in ("ring_w2.json", "ring_w4.json", "ring_w4_128k.json"):
        measured = load(H200_RUNS / path)
        for r in measured["results"]:
            replay = next((d for d in dense if (d["world_size"], d["heads"], d["kv_heads"], d["seq_per_gpu"]) == (measured["gpus"], r["heads"], r["kv_heads"], r["seq_per_gpu"])), None)
            ms = r["ms"].get("ours_copy_engine")
            if replay is None or ms is None:
                continue
            check = check_ms(checks, measured["gpus"]) if measured["settings"]["consistency_check"] else 0.0
            predicted = ring_ms(*replay_inputs(replay["zigzag"]), link, check)[r["mode"]]
            hop_bytes = {"kv": replay["zigzag"]["kv_hop_bytes"], "dkv": replay["zigzag"]["dkv_hop_bytes"]}
            compute = {direction: rank_step_compute(replay["zigzag"], direction) for direction in ("forward", "backward")}
            timeline = timeline_ms(compute, hop_bytes, link, check, ahead=1)[r["mode"]]  # the dense ring: one hop ahead
            rows.append({
                "source": path, "world_size": measured["gpus"], "heads": r["heads"], "kv_heads": r["kv_heads"], "seq_per_gpu": r["seq_per_gpu"],
                "mode": r["mode"], "measured_ms": ms, "predicted_ms": predicted, "error": predicted / ms - 1,
                "timeline_ms": timeline, "timeline_error": timeline / ms - 1,
            })
    return rows


def dense_at(world_size: int, replay: dict, compute_scale: float) -> tuple[dict, dict]:
    """A dense zigzag ring of `world_size` from a W = 4 replay: its step 0, then W - 1 steps like
    its others (every later step's blocks have one shape)."""
    compute, hop = replay_inputs(replay, compute_scale)
    return {direction: [steps[0]] + [statistics.mean(steps[1:])] * (world_size - 1) for direction, steps in compute.items()}, hop


def predict(dense: list[dict], packed: list[dict], link: dict, checks: dict[int, float], single_gpu_ms: dict[int, float]) -> list[dict]:
    """`single_gpu_ms`: one GPU over a W = 4 ring's whole sequence, fwd+bwd, by S per GPU."""
    out = []
    for machine, scales in (("H200", H200), ("GB200 NVL72", GB200)):
        for seq in (8192, 32768):
            replay = next(d for d in dense if (d["world_size"], d["heads"], d["kv_heads"], d["seq_per_gpu"]) == (4, 32, 8, seq))
            single = single_gpu_ms[seq] * scales["compute_scale"]
            for world_size in PREDICT_WORLD_SIZES:
                compute, hop = dense_at(world_size, replay["zigzag"], scales["compute_scale"])
                ms = ring_ms(compute, hop, link, check_ms(checks, world_size), scales["bandwidth_scale"])
                # one GPU over the whole sequence: causal attention's time grows as its length squared
                one_device = single * (world_size / 4) ** 2
                out.append({
                    "machine": machine, "assumed": scales["assumed"], "input": f"dense {seq // 1024}K per GPU, 32:8", "world_size": world_size,
                    "fwdbwd_ms": ms["fwdbwd"], "efficiency_vs_one_device": one_device / (world_size * ms["fwdbwd"]),
                })
        for row in packed:
            for layout in ("balanced", "zigzag"):
                compute, hop = replay_inputs(row[layout], scales["compute_scale"])
                ms = ring_ms(compute, hop, link, check_ms(checks, row["world_size"]), scales["bandwidth_scale"])
                up = (row["upstream_one_device_ms"]["forward"] + row["upstream_one_device_ms"]["backward"]) * scales["compute_scale"]
                flops = row["mask_flops"]["forward"] + row["mask_flops"]["backward"]
                out.append({
                    "machine": machine, "assumed": scales["assumed"], "input": f"packed {row['mix']} {row['heads']}:{row['kv_heads']} {layout}",
                    "world_size": row["world_size"], "fwdbwd_ms": ms["fwdbwd"],
                    "efficiency_vs_one_device": up / (row["world_size"] * ms["fwdbwd"]),
                    "tflops_per_gpu": flops / row["world_size"] / (ms["fwdbwd"] * 1e-3) / 1e12,
                })
    return out


def replayed_splits(replay: dict, link: dict, checks: dict[int, float]) -> list[dict]:
    """Each split of a bench/magi_replay.py run (every ring rank of the split replayed alone on one
    GPU, at that W, against upstream FA4 on one device in the same run) with its transfers
    modelled: each rank runs its replayed steps as their KV arrives (`ring_timeline_ms`, the
    streams KV_HOPS_AHEAD hops ahead of the compute, and one ahead as before 2026-12-06's session
    22), each hop the copy engine's fitted time for the most any rank receives; the Ulysses all-to-alls at tuning/mesh_model.py's figures
    (ASSUMED: no multi-GPU run has measured them), in a split replayed in head chunks pipelined
    with the chunks' rings as runtime/ulysses.py posts them (mesh_model.pipeline_ms), else around
    the ring, plus the exchanges' layout copies (mesh_model.layout_ms: SM work the replay does not
    run, charged since 2026-12-07; none since 2026-12-08, whose copy engine places what arrives
    inside each exchange); the cross-rank check apart, since a group with a CPU backend beside NCCL checks on
    the host. GB200 NVL72 as in `predict` (ASSUMED). `picked_by_plan_mesh`: whether plan_mesh, at
    this checkout, picks the split and head chunks for the batch (bench/mixes.py regenerates it)."""
    from mixes import batches

    from fa4_cp import plan_mesh
    from fa4_cp.runtime.travelling import KV_HOPS_AHEAD
    from fa4_cp.tuning.mesh_model import (
        GB200_NVL72, H200 as H200_MACHINE, LAYOUT_H100_GIB_PER_S, LOCAL_COPY_H100_GIB_PER_S, all_to_all_ms, exchange_parts_ms, layout_ms,
        pipeline_ms,
    )

    picks = {}
    for row in replay["rows"]:
        _, world, lengths = next(batches([row["mix"]], [row["world_size"]], replay["tokens_per_gpu"]))
        assert len(lengths) == row["documents"], "the replay's batch is not bench/mixes.py's"
        plan = plan_mesh(world, replay["heads"], replay["kv_heads"], sum(lengths), head_dim=replay["head_dim"], documents=lengths)
        picks[row["mix"], world] = (plan.ulysses, plan.head_chunks)
    out = []
    # the exchanges' copies at the replay's GPU's rates: its compute is that GPU's
    h100_copies = dict(layout_gib_per_s=LAYOUT_H100_GIB_PER_S, local_copy_gib_per_s=LOCAL_COPY_H100_GIB_PER_S)
    replayed = dataclasses.replace(H200_MACHINE, **h100_copies) if "H100" in replay["device"] else H200_MACHINE
    for machine, scales, exchange in ((f"{replay['device']} compute, H200 hops", H200, replayed), ("GB200 NVL72", GB200, GB200_NVL72)):
        for row in replay["rows"]:
            world, one_device = row["world_size"], row.get("upstream_one_device_ms")
            if one_device is None:
                continue
            one_device_ms = (one_device["forward"] + one_device["backward"]) * scales["compute_scale"]
            for split in ("chosen", "plain_ring", *sorted(key for key in row if key.startswith(("ulysses_", "chosen_chunks_")))):
                part = row.get(split)
                if part is None:
                    continue
                chunks = part.get("head_chunks", 1)  # a chunked replay's times are one chunk's ring's, taken `chunks` times
                compute = {d: rank_step_compute(part, d, scales["compute_scale"] / chunks) for d in ("forward", "backward")}
                hop_bytes = {name: max(rank[f"{name}_hop_bytes"] for rank in part["ranks"]) for name in ("kv", "dkv")}
                slowest = {d: step_compute(part, d, scales["compute_scale"]) for d in ("forward", "backward")}
                lock_step = ring_ms(slowest, hop_bytes, link, 0.0, scales["bandwidth_scale"])
                # the balanced layout's streams run KV_HOPS_AHEAD hops ahead (runtime/travelling.py); before, one
                passes, one_ahead = (timeline_ms(compute, hop_bytes, link, 0.0, depth, scales["bandwidth_scale"]) for depth in (KV_HOPS_AHEAD, 1))
                compute_ms = chunks * slowest_replayed_rank_ms(compute)
                shape = (part["ulysses"], part["ring"], replay["heads"], replay["kv_heads"], replay["tokens_per_gpu"] * world, replay["head_dim"], exchange)
                exchanges = all_to_all_ms(*shape)

                def call_ms(ring: dict) -> float:
                    """The chunks' rings between their exchanges (runtime/ulysses.py's pipeline), or the ring alone."""
                    if part["ulysses"] == 1:
                        return ring["fwdbwd"]
                    parts = exchange_parts_ms(*shape, chunks)
                    rings = {"forward": ring["fwd"], "backward": ring["fwdbwd"] - ring["fwd"]}
                    return sum(pipeline_ms(parts[f"{d}_in"], [rings[d]] * chunks, parts[f"{d}_out"]) for d in rings)

                # the exchanges' layout copies: SM work beside the ring on any transport (replays leave them out)
                copies = layout_ms(*shape)
                ring, total = chunks * passes["fwdbwd"], call_ms(passes) + copies
                check = check_ms(checks, world)
                what_if = {}
                if part["ulysses"] == 1:  # a plain ring's remote blocks in one launch a rank (a model)
                    merged = {d: one_remote_launch_compute(part, d, scales["compute_scale"]) for d in ("forward", "backward")}
                    gathered = {d: one_remote_launch_compute(part, d, scales["compute_scale"], one_hop=True) for d in ("forward", "backward")}
                    merged_passes, gathered_passes = (
                        timeline_ms(c, hop_bytes, link, 0.0, KV_HOPS_AHEAD, scales["bandwidth_scale"]) for c in (merged, gathered)
                    )
                    what_if = {
                        "one_remote_launch_compute_only_efficiency": one_device_ms / (world * slowest_replayed_rank_ms(merged)),
                        "one_remote_launch_efficiency_vs_one_device": one_device_ms / (world * merged_passes["fwdbwd"]),
                        "one_remote_launch_one_hop_efficiency_vs_one_device": one_device_ms / (world * gathered_passes["fwdbwd"]),
                    }
                out.append({
                    "machine": machine, "assumed": scales["assumed"], "mix": row["mix"], "world_size": world, "split": split,
                    "ulysses": part["ulysses"], "ring": part["ring"], "head_chunks": chunks, "active_steps": len(compute["forward"][0]),
                    "picked_by_plan_mesh": picks[row["mix"], world] == (part["ulysses"], chunks),
                    "slowest_rank_compute_ms": compute_ms, "ring_ms": ring, "lock_step_ring_ms": lock_step["fwdbwd"], "all_to_all_ms": exchanges,
                    "exposed_all_to_all_ms": total - copies - ring, "layout_copies_ms": copies, "fwdbwd_ms": total, "compute_only_efficiency": one_device_ms / (world * compute_ms),
                    "efficiency_vs_one_device": one_device_ms / (world * total),
                    "efficiency_with_nccl_check": one_device_ms / (world * (total + check)),
                    "efficiency_one_hop_ahead": one_device_ms / (world * (call_ms(one_ahead) + copies)),
                    **what_if,
                })
    return out


def plot(predictions: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, machine in zip(axes, ("H200", "GB200 NVL72")):
        lines: dict[str, list[tuple[int, float]]] = {}
        for p in predictions:
            if p["machine"] != machine:
                continue
            lines.setdefault(p["input"], []).append((p["world_size"], p["efficiency_vs_one_device"]))
        for label, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", linestyle="--" if "zigzag" in label else "-", label=label)
        ax.set_title(f"{machine}{' (ASSUMED figures)' if machine != 'H200' else ''}: predicted fwd+bwd efficiency")
        ax.set_xlabel("ring size W")
        ax.set_ylabel("efficiency: one device / (W x ring)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay-dense", default=DAY / "varlen_dense_replay_2026-12-01.json")
    parser.add_argument("--replay-packed", default=DAY / "varlen_packed_2026-12-01.json.gz")
    parser.add_argument("--out-dir", default=DAY)
    parser.add_argument(
        "--replay-magi", nargs="+", help="bench/magi_replay.py runs: predict their splits with transfers (`replayed_splits`) into --out instead",
    )
    parser.add_argument("--out", help="with --replay-magi: the JSON to write")
    args = parser.parse_args()
    link = fit_link(load(H200_RUNS / "transport_bandwidth_w2.json"))
    checks = check_costs(load(RESULTS / "consistency_check_cuda_2026-11-21.json"), load(H200_RUNS / "ring_w4_8k_nocheck_profile.json"), load(H200_RUNS / "ring_w4.json"))
    if args.replay_magi:
        if not args.out:
            parser.error("--replay-magi: give --out")
        replays = {path: load(Path(path)) for path in args.replay_magi}
        predictions = [
            {"replay": path, "replay_commit": replay["git_commit"], **prediction}
            for path, replay in replays.items() for prediction in replayed_splits(replay, link, checks)
        ]
        # the timeline against the committed two- and four-GPU dense runs, beside the lock-step sum
        validation = validate(load(Path(args.replay_dense))["dense"], link, checks)
        write(record(
            "ring_model_replayed_splits", "cpu", link=link, check_ms_by_world_size=checks, gb200_assumptions=GB200, inputs=list(replays),
            validation=validation, max_abs_error={name: max(abs(v[name]) for v in validation) for name in ("error", "timeline_error")},
            method="each rank runs its replayed steps as their KV arrives (ring_timeline_ms: a hop moves once the sender holds the KV, "
            "the hop before it has landed and its buffer is free on both ranks), a hop the copy engine's fit for the most bytes any "
            "rank receives; plus the all-to-alls at tuning/mesh_model.py's assumed figures; the cross-rank check apart "
            "(efficiency_with_nccl_check); lock_step_ring_ms: the lock-step sum beside; one_remote_launch_*: a plain ring's "
            "what-if with each rank's remote blocks in one launch (one_remote_launch_compute), a model; *_one_hop: with their KV "
            "gathered as fast as one hop (a bound)",
            predictions=predictions,
        ), args.out)
        for v in validation:
            print(f"{v['source']:18} W={v['world_size']} {v['seq_per_gpu']:>6} {v['mode']:6} measured {v['measured_ms']:8.2f} lock-step "
                  f"{v['error']:+.1%} timeline {v['timeline_error']:+.1%}")
        for p in predictions:
            print(f"{p['machine'][:34]:34} {p['mix']:8} W={p['world_size']:<3} {p['ulysses']} x {p['ring']:<3} {p['split']:10} compute only "
                  f"{p['compute_only_efficiency']:.3f}, with transfers {p['efficiency_vs_one_device']:.3f} (check on NCCL "
                  f"{p['efficiency_with_nccl_check']:.3f}; one hop ahead {p['efficiency_one_hop_ahead']:.3f})")
        return
    dense = load(Path(args.replay_dense))["dense"]
    packed = load(Path(args.replay_packed))["packed"]
    validation = validate(dense, link, checks)
    w4 = load(H200_RUNS / "ring_w4.json")
    single = {r["seq_per_gpu"]: r["ms"]["single"] for r in w4["results"] if (r["heads"], r["kv_heads"], r["mode"]) == (32, 8, "fwdbwd")}
    predictions = predict(dense, packed, link, checks, single)
    result = record(
        "ring_model", "cpu", link=link, check_ms_by_world_size=checks, gb200_assumptions=GB200,
        inputs={"replay_dense": str(args.replay_dense), "replay_packed": str(args.replay_packed)},
        validation=validation, max_abs_error=max(abs(v["error"]) for v in validation), predictions=predictions,
    )
    out = Path(args.out_dir)
    write(result, out / "ring_model_2026-12-01.json")
    plot(predictions, out / "ring_model_2026-12-01.png")
    print(f"link {link['gib_per_s']:.0f} GiB/s + {link['latency_ms'] * 1e3:.0f} us; check ms by W {checks}")
    for v in validation:
        print(f"{v['source']:18} W={v['world_size']} {v['heads']}:{v['kv_heads']:<2} {v['seq_per_gpu']:>6} {v['mode']:6} measured {v['measured_ms']:8.2f} predicted {v['predicted_ms']:8.2f} ({v['error']:+.1%})")


if __name__ == "__main__":
    main()
