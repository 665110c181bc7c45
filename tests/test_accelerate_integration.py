"""The accelerate path on 2 CPU processes (torchrun + Accelerator: accelerate refuses
ParallelismConfig on CPU, so the plugin builds the cp mesh itself): the loss accelerate reports
and the gradients DDP averages equal the unsharded model's, with and without packed documents."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from hf_models import unsharded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def torchrun_two_cpu_processes(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `script` (relative to the repository) on 2 CPU processes; fail the test if it fails."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / script), *args]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished


def test_accelerate_ring_of_two_matches_the_unsharded_model(tmp_path):
    out = tmp_path / "results.npz"
    torchrun_two_cpu_processes("tests/workers/accelerate_ring.py", str(out))
    results = np.load(out)
    assert {int(results[f"uauto:{packed}:ring_dims"]) for packed in (False, True)} <= {1, 2}, "auto: the cp dim or its 2-D split"
    for ulysses in (1, 2, "auto"):
        if ulysses != "auto":
            assert int(results[f"u{ulysses}:mesh_dims"]) == (2 if ulysses > 1 else 1), "ulysses=2 runs on a 2-D mesh"
        for packed in (False, True):
            loss, grads = unsharded("llama", packed)
            torch.testing.assert_close(torch.from_numpy(results[f"u{ulysses}:loss_{packed}"]), loss, rtol=1e-5, atol=1e-6)
            for name, grad in grads.items():
                got = torch.from_numpy(results[f"u{ulysses}:{packed}:{name}"])
                torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"ulysses {ulysses} {name}: {m}")


def test_plugin_needs_a_cp_dim_or_cp_size():
    from fa4_cp.integrations.accelerate import RingAttentionPlugin

    class NoMesh:
        torch_device_mesh = None
        num_processes = 3

    with pytest.raises(ValueError, match="cp_size: the Accelerator has no 'cp' mesh dim"):
        RingAttentionPlugin(NoMesh())
    with pytest.raises(ValueError, match=r"cp_size: 2 must divide the number of processes \(3\)"):
        RingAttentionPlugin(NoMesh(), cp_size=2)


def test_accelerate_example_trains_on_two_cpu_processes(tmp_path):
    out = tmp_path / "summary.json"
    finished = torchrun_two_cpu_processes(
        "launch/accelerate_train.py", "--cpu", "--cp-size", "2", "--seq-len", "256", "--steps", "3", "--tiny",
        "--warmup-steps", "1", "--out", str(out), "--ulysses", "auto",
    )
    losses = [float(line.split("loss ")[1].split()[0]) for line in finished.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and 5.0 < losses[0] < 6.0  # a byte model starts near ln 256 = 5.55
    summary = json.loads(out.read_text())
    assert [record["loss"] for record in summary["steps_log"]] == pytest.approx(losses, abs=1e-4)
    median = sorted(record["step_seconds"] for record in summary["steps_log"][1:])[0:2]
    assert summary["median_step_seconds"] == pytest.approx(sum(median) / 2)
    assert summary["tokens_per_s"] == pytest.approx(256 / summary["median_step_seconds"])
    assert (summary["attention"], summary["processes"], summary["cp_size"]) == ("fa4_cp", 2, 2)


@pytest.mark.parametrize(
    "packed,accumulation", [(False, 1), (True, 1), (False, 2)], ids=["one_sequence", "packed_documents", "accumulate_two"]
)
def test_trainer_step_matches_the_unsharded_gradient(packed, accumulation, tmp_path):
    """One SGD step (lr 0.1) of RingAttentionTrainer at cp = 2 moves every parameter by -0.1 x
    the unsharded model's gradient (the mean over the accumulated micro-batches), and logs the
    unsharded loss."""
    from hf_models import flipped, full_batch, tiny_model

    out = tmp_path / "trainer.npz"
    worker_args = (str(out), "packed" if packed else "one", str(tmp_path / "trainer_output"), str(accumulation))
    torchrun_two_cpu_processes("tests/workers/trainer_ring.py", *worker_args)
    results = np.load(out)
    batches = [full_batch(packed), flipped(full_batch(packed))]
    trained = [batches[int(results["first"])]] if accumulation == 1 else batches
    losses, gradients = zip(*(unsharded("llama", packed, batch) for batch in trained))
    loss = sum(losses) / len(trained)
    grads = {name: sum(g[name] for g in gradients) / len(trained) for name in gradients[0]}
    assert abs(float(results["loss"][0]) - float(loss)) < 1e-4
    start = dict(tiny_model("llama", "sdpa").named_parameters())
    for name, grad in grads.items():
        expected = start[name].detach() - 0.1 * grad
        torch.testing.assert_close(torch.from_numpy(results[name]), expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
