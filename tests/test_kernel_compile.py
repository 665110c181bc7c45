"""Every CuTe-DSL kernel of the FA4 backend compiles for sm_90a and sm_100a, on a machine with no
GPU (CUTE_DSL_ARCH), so that an upgrade of the pinned DSL or an edit that breaks a kernel fails
here, not on a GPU. Skipped without the GPU stack (the fa4 extra and triton)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flash_attn.cute")

WORKER = Path(__file__).resolve().parent / "workers" / "compile_kernels.py"
ROOT = Path(__file__).resolve().parents[1]


ARCHES = {"sm_90a": 132, "sm_100a": 148}
SHARDS = {"sm_90a": 2, "sm_100a": 1}  # Hopper's list is the longer: two processes share it


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory) -> dict:
    """Both architectures' compiles, run at once (three processes: CI's two cores both work)."""
    running = {}
    for arch, sms in ARCHES.items():
        env = {
            **os.environ, "CUTE_DSL_ARCH": arch, "FLASH_ATTENTION_ARCH": arch, "FLASH_ATTENTION_NUM_SMS": str(sms),
            "CUTE_DSL_KEEP": "ptx", "FA4_CP_KERNEL_CACHE": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        for shard in range(SHARDS[arch]):
            running[arch, shard] = subprocess.Popen(
                [sys.executable, str(WORKER), arch, str(shard), str(SHARDS[arch])], cwd=tmp_path_factory.mktemp(arch), env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
    return {key: (process, *process.communicate(timeout=600)) for key, process in running.items()}


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
