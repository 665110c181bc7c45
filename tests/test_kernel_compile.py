"""Every CuTe-DSL kernel of the FA4 backend compiles for sm_90a and sm_100a, on a machine with no
GPU (CUTE_DSL_ARCH), so that an upgrade of the pinned DSL or an edit that breaks a kernel fails
here, not on a GPU. Skipped without the GPU stack (the fa4 extra and triton)."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("flash_attn.cute")

WORKER = Path(__file__).resolve().parent / "workers" / "compile_kernels.py"
ROOT = Path(__file__).resolve().parents[1]


ARCHES = {"sm_90a": 132, "sm_100a": 148}
SHARDS = {"sm_90a": 2, "sm_100a": 1}  # Hopper's list is the longer: two processes share it
_running: dict[tuple[str, int], tuple[subprocess.Popen, Path]] = {}


def start_compiles() -> dict[tuple[str, int], tuple[subprocess.Popen, Path]]:
    """Both architectures' compiles (three processes), started once, at the lowest priority.
    conftest.py starts them before the suite's first test and runs this file's tests last, so
    that the compiles (a minute of both of CI's cores) take what CPU the other tests leave."""
    if _running:
        return _running
    root = Path(tempfile.mkdtemp(prefix="fa4_cp_compile_"))
    atexit.register(_stop, root)
    for arch, sms in ARCHES.items():
        env = {
            **os.environ, "CUTE_DSL_ARCH": arch, "FLASH_ATTENTION_ARCH": arch, "FLASH_ATTENTION_NUM_SMS": str(sms),
            "CUTE_DSL_KEEP": "ptx", "FA4_CP_KERNEL_CACHE": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        for shard in range(SHARDS[arch]):
            work = root / f"{arch}-{shard}"  # the worker reads the PTX it keeps from its working directory
            work.mkdir()
            with open(work / "stdout", "w") as stdout, open(work / "stderr", "w") as stderr:
                process = subprocess.Popen(
                    [sys.executable, str(WORKER), arch, str(shard), str(SHARDS[arch])], cwd=work, env=env,
                    stdout=stdout, stderr=stderr, preexec_fn=lambda: os.nice(19),
                )
            _running[arch, shard] = process, work
    return _running


def _stop(root: Path) -> None:
    for process, _ in _running.values():
        process.kill()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def compile_runs() -> dict:
    """Each compile's (process, stdout, stderr) once it has ended."""
    finished = {}
    for key, (process, work) in start_compiles().items():
        process.wait(timeout=600)
        finished[key] = process, (work / "stdout").read_text(), (work / "stderr").read_text()
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_compiles_for(arch, compile_runs):
    reports = []
    for shard in range(SHARDS[arch]):
        process, stdout, stderr = compile_runs[arch, shard]
        assert process.returncode == 0, stderr[-4000:]
        report = json.loads(stdout.strip().splitlines()[-1])
        reports.append(report)
        failed = {name: error for name, error in report["errors"].items() if error}
        assert not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())
        assert report["ptx_files"] and report["ptx_targets"] == [arch], report  # the PTX kept is for the target
        # rows of fp32 (and of dK/dV) stored as vectors, not one value at a time: only the lse's
        # 8-byte values are stored singly
        for kernel, stores in report["stores"].items():
            assert all(".v" in op or op.endswith(".b64") for op in stores), (kernel, stores)
    compiled = {kernel for report in reports for kernel, ops in report["stores"].items() if ops}
    assert compiled == ({"PartialsForwardSm90", "FinishDkv", "MergePartials"} if arch == "sm_90a" else {"MergePartials"}), compiled
    # the merging forwards prefetch their rows' prior out into L2 (not with packed q heads, nor the
    # first-write ones, which have none to read)
    assert (sum(report["prefetches"] for report in reports) > 0) == (arch == "sm_90a")
    # the accumulating backwards add dK/dV pairs of adjacent columns (Blackwell's always; Hopper's
    # one value at a time only where its dK/dV MMA operands are swapped); their other reductions
    # are the deterministic turns' counters
    reductions = {kernel: sorted({op for report in reports for op in report["reductions"][kernel]}) for kernel in reports[0]["reductions"]}
    v2, turn = "red.relaxed.gpu.global.add.v2.f32", "red.release.gpu.global.add.s32"
    if arch == "sm_90a":
        assert v2 in reductions["AccumulatingBackwardSm90"] and not reductions["AccumulatingBackwardSm100"], reductions
    else:
        assert reductions == {"AccumulatingBackwardSm90": [], "AccumulatingBackwardSm100": sorted([v2, turn])}, reductions
