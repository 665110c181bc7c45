"""The GPU benchmarks' CPU dry runs: every code path of a replay on the reference backend, so that a
bench error shows here and not in a lease's scarce minutes (session 12's replay failed on its first
rank over a bench bug)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_magi_replay_dry_run_records_gpu_and_paced_times(tmp_path):
    out = tmp_path / "magi.json"
    subprocess.run(
        [sys.executable, "magi_replay.py", "--dry-run", "--world-sizes", "8", "--out", str(out)], cwd=BENCH, check=True,
        capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text())
    assert {row["mix"] for row in result["rows"]} == {"pretrain", "finetune"}
    for row in result["rows"]:
        chosen = row["chosen"]
        assert len(chosen["ranks"]) == chosen["ring"]
        for direction in ("forward", "backward"):
            assert chosen[direction]["slowest_ms"] > 0 and chosen[direction]["tflops_per_gpu_paced"] > 0
            for rank in chosen["ranks"]:
                assert rank[f"{direction}_paced_ms"] > 0 and len(rank[f"{direction}_step_attention_ms"]) == len(rank["steps"])
