"""The GPU benchmarks' CPU dry runs: every code path of a replay on the reference backend, so that a
bench error shows here and not in a lease's scarce minutes (session 12's replay failed on its first
rank over a bench bug)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_magi_replay_dry_run_records_gpu_and_paced_times(tmp_path):
    out = tmp_path / "magi.json"
    subprocess.run(
        [sys.executable, "magi_replay.py", "--dry-run", "--world-sizes", "8", "--also-ulysses", "2", "--head-chunks", "2", "--out", str(out)],
        cwd=BENCH,
        check=True, capture_output=True, text=True, timeout=300,
    )
    # the replay's cost fits run on its JSON: per step, beside attention, and the remote blocks per rank
    fitted = tmp_path / "fit.json"
    subprocess.run(
        [sys.executable, "fit_replay_costs.py", str(out), "--out", str(fitted)], cwd=BENCH, check=True, capture_output=True, text=True, timeout=300,
    )
    fits = json.loads(fitted.read_text())
    assert "one device + q tiles + sequences + launches" in fits["fits"]["forward"] and fits["steps"] == len(fits["data"])
    assert {"pretrain", "finetune"} <= set(fits["remote_blocks"]) and all(
        set(fit["both"]["us"]) == {"constant_per_world_size", "remote_fixed", "remote_launch"} for fit in fits["remote_blocks"].values()
    )
    result = json.loads(out.read_text())
    assert {row["mix"] for row in result["rows"]} == {"pretrain", "finetune"}
    assert all(row["ulysses_2"]["ulysses"] == 2 for row in result["rows"] if row["chosen"]["ulysses"] != 2)
    # a 2-D split in head chunks: one chunk's ring of h / (u c) heads, its times taken c times
    chunked = [row[key] for row in result["rows"] for key in row if key.endswith("_chunks_2")]
    assert chunked and all(split["head_chunks"] == 2 and split["forward"]["slowest_ms"] > 0 for split in chunked)
    # ring_model adds the transfers to every split the replay ran (no upstream time on CPU: none predicted there)
    predicted = tmp_path / "ring_model.json"
    subprocess.run(
        [sys.executable, "ring_model.py", "--replay-magi", str(out), "--out", str(predicted)], cwd=BENCH, check=True, capture_output=True,
        text=True, timeout=300,
    )
    assert json.loads(predicted.read_text())["validation"]
    for row in result["rows"]:
        chosen = row["chosen"]
        assert len(chosen["ranks"]) == chosen["ring"]
        for direction in ("forward", "backward"):
            assert chosen[direction]["slowest_ms"] > 0 and chosen[direction]["tflops_per_gpu_paced"] > 0
            for rank in chosen["ranks"]:
                assert rank[f"{direction}_paced_ms"] > 0 and len(rank[f"{direction}_step_attention_ms"]) == len(rank["steps"])


def test_placement_replay_dry_run_replays_every_distinct_candidate(tmp_path):
    out = tmp_path / "placements.json"
    subprocess.run(
        [sys.executable, "placement_replay.py", "--dry-run", "--cases", "finetune_w16", "pretrain_mesh_8x8", "--out", str(out)], cwd=BENCH,
        check=True, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert [row["case"] for row in result["rows"]] == ["finetune_w16", "pretrain_mesh_8x8"]
    for row in result["rows"]:
        candidates = row["candidates"]
        assert sum(c["chosen"] for c in candidates) == 1 and candidates[row["chosen_index"]]["chosen"]
        assert row["ranked_by"] == "measured"
        for candidate in candidates:
            measured = candidate["measured"]
            assert len(measured["ring_steps"]) == len(candidate["modelled"]["per_rank_ms"]) == row["ring"]
            assert candidate["plans"]["blocks"] >= row["ring"] and candidate["plans"]["pairs"] > 0
            for direction in ("forward", "backward"):
                part = measured[direction]
                assert len(part["per_rank_ms"]) == row["ring"] and part["slowest_ms"] > 0
                assert part["sum_ms"] == pytest.approx(row["ulysses"] * sum(part["per_rank_ms"]))
        traded = row["kept_documents_traded"]  # the layout's placement, where its trades change the chosen candidate
        assert traded is None or len(traded["measured"]["ring_steps"]) == row["ring"]
    # the remote launches' cost fitted on it: every candidate's ranks rebuilt from the same plans
    fitted = tmp_path / "fit.json"
    subprocess.run(
        [sys.executable, "fit_placement_costs.py", str(out), "--out", str(fitted)], cwd=BENCH, check=True, capture_output=True, text=True,
        timeout=300,
    )
    fits = json.loads(fitted.read_text())
    assert set(fits["fits"]) == {"per launch", "per launch per 64 heads"} and [pick["case"] for pick in fits["picks"]] == ["finetune_w16", "pretrain_mesh_8x8"]
    assert len(fits["ranks"]) == sum(len(row["candidates"]) * row["ring"] for row in result["rows"])


def test_launches_counts_the_remote_forward_grid_over_the_computed_prefix(tmp_path):
    """bench/launches.py (planner counts, no GPU): a remote launch over its computed prefix alone
    schedules fewer tiles than over every local sequence, never more."""
    out = tmp_path / "launches.json"
    subprocess.run(
        [sys.executable, "launches.py", "--world-sizes", "8", "--out", str(out)], cwd=BENCH, check=True, capture_output=True, text=True, timeout=300,
    )
    for row in json.loads(out.read_text())["rows"]:
        grid = row["ring"]["remote_forward_grid_tiles_per_kv_head_mean"]
        assert 0 < grid["computed_prefix"] < grid["every_sequence"], row


def test_ring_timeline_couples_ranks_only_through_hops_and_buffers():
    """bench/ring_model.py's timeline: ranks whose steps cost alike take the lock-step sum; a rank's
    long first step delays its neighbours' later KV with two buffers a stream, less with more."""
    from bench_modules import bench_module

    model = bench_module("ring_model")
    even = [[1.0, 1.0, 1.0, 1.0] for _ in range(4)]
    assert model.ring_timeline_ms(even, 0.5) == pytest.approx(4.0)
    assert model.ring_timeline_ms(even, 2.0) == pytest.approx(1.0 + 3 * 2.0)  # hop-bound: each step waits for its hop
    uneven = [[5.0, 0.1, 0.1, 0.1]] + [[0.1, 1.0, 1.0, 1.0] for _ in range(3)]
    one_ahead, four_ahead = (model.ring_timeline_ms(uneven, 0.2, ahead=ahead) for ahead in (1, 4))
    assert four_ahead == pytest.approx(5.3) and one_ahead > 5.0 + 2 * 1.0  # rank 0's neighbours wait for its step 0


def test_one_remote_launch_what_if_sums_a_ranks_remote_steps_less_the_launches_saved():
    """bench/ring_model.py's sparse-gather what-if: a rank's remote steps become one at its last
    active step, their times summed less a launch for each step merged; the local step and the
    work beside attention stay."""
    from bench_modules import bench_module

    model = bench_module("ring_model")
    saved = model.SAVED_LAUNCH_MS["forward"]
    row = {"ranks": [
        {"forward_step_attention_ms": [1.0, 0.1, 0.0, 0.2, 0.1, 0.0], "forward_ms": 1.6},  # 0.2 ms beside attention
        {"forward_step_attention_ms": [2.0, 0.0, 0.0, 0.0, 0.0, 0.0], "forward_ms": 2.0},  # all local
    ]}
    merged, plain = model.one_remote_launch_compute(row, "forward"), model.rank_step_compute(row, "forward")
    other = 0.2 / 6
    assert merged[0] == pytest.approx([1.0 + other, other, other, other, 0.4 - 2 * saved + other, other])
    assert merged[1] == plain[1]
    assert sum(merged[0]) == pytest.approx(sum(plain[0]) - 2 * saved)
    gathered = model.one_remote_launch_compute(row, "forward", one_hop=True)
    assert gathered == [pytest.approx([1.1, 0.4 - 2 * saved + 0.1]), pytest.approx([2.0, 0.0])]


def test_layout_cost_fits_the_copies_rate_and_predicts_each_split_with_and_without_them(tmp_path):
    """bench/layout_cost.py on a committed gpu_work JSON: the layout copies' rate from its 2-D cases
    (plan_mesh's H100 figure), and plan_mesh's predictions with the copies the code makes and
    without any: no SM copy is left, and only the 2-D splits pay the copy engine's placing."""
    from fa4_cp.tuning.mesh_model import LAYOUT_H100_GIB_PER_S

    out = tmp_path / "layout_cost.json"
    gpu_work = BENCH / "results" / "nvidia_h100_2026-12-07_s28" / "gpu_work.json.gz"
    subprocess.run(
        [sys.executable, "layout_cost.py", str(gpu_work), "--out", str(out)], cwd=BENCH, check=True, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert len(result["measured_cases"]) == 4 and result["fitted_gib_per_s"] == pytest.approx(LAYOUT_H100_GIB_PER_S, rel=0.01)
    for before, after in zip(result["without_any_copies"], result["with_layout_copies"], strict=True):
        assert before["plain_ring_ms"] == after["plain_ring_ms"], "a plain ring exchanges nothing"
        for split, predicted in after["splits"].items():
            assert predicted["layout_copies_ms"] == 0, "the code since 2026-12-08 leaves no SM copy"
            placing = predicted["ms"] - before["splits"][split]["ms"]  # the copy engine's, inside the exchanges
            assert placing == 0 if split.startswith("1 x") else placing > 0


def test_layout_cost_fits_the_copy_engines_placing_from_a_run_of_the_placing_code(tmp_path):
    """bench/layout_cost.py --code placed on session 37's H100 gpu_work: no SM copy to fit, and the
    copy engine's placing at plan_mesh's H100 figure."""
    from fa4_cp.tuning.mesh_model import LOCAL_COPY_H100_GIB_PER_S

    out = tmp_path / "layout_cost.json"
    gpu_work = BENCH / "results" / "nvidia_h100_2026-12-08_s37" / "gpu_work_2d.json"
    subprocess.run(
        [sys.executable, "layout_cost.py", str(gpu_work), "--code", "placed", "--out", str(out)],
        cwd=BENCH, check=True, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["fitted_gib_per_s"] is None and not result["measured_cases"]
    assert len(result["copy_engine_cases"]) == 2 and result["fitted_copy_engine_gib_per_s"] == pytest.approx(LOCAL_COPY_H100_GIB_PER_S, rel=0.01)


def test_host_profile_dry_run_times_the_ring_functions_of_each_call(tmp_path):
    out = tmp_path / "host_profile.json"
    subprocess.run(
        [sys.executable, "host_profile.py", "--dry-run", "--calls", "3", "--heads", "4:2", "--out", str(out)],
        cwd=BENCH, check=True, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert set(result["call_us"]) == {"forward", "backward"} and all(us > 0 for us in result["call_us"].values())
    assert result["call_us_by_dispatch"]["eager"] == result["call_us"] and set(result["call_us_by_dispatch"]["op"]) == {"forward", "backward"}
    spans = result["spans"]
    # an eager call runs the bodies through the autograd.Function, not torch's custom op
    assert spans["fa4_cp.ops:EagerRingAttention.forward"]["entries_per_call"] == 1 and "fa4_cp.attention:ring_attention_op" not in spans
    # one ring run each way; the plan and transport looked up once per direction
    assert spans["fa4_cp.ops:ring_run_forward"]["entries_per_call"] == spans["fa4_cp.ops:ring_run_backward"]["entries_per_call"] == 1
    assert spans["fa4_cp.runtime.ring_run:_ring"]["entries_per_call"] == 2
    assert spans["fa4_cp.ops:ring_run_forward"]["us"] <= result["call_us"]["forward"]
    assert out.with_suffix(".txt").read_text().startswith("3 calls of ring_attention fwd+bwd")
