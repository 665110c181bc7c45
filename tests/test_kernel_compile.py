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


@pytest.mark.slow
@pytest.mark.parametrize("arch,sms", [("sm_90a", 132), ("sm_100a", 148)])
def test_every_kernel_compiles_for(arch, sms, tmp_path):
    env = {
        **os.environ, "CUTE_DSL_ARCH": arch, "FLASH_ATTENTION_ARCH": arch, "FLASH_ATTENTION_NUM_SMS": str(sms),
        "CUTE_DSL_KEEP": "ptx", "FA4_CP_KERNEL_CACHE": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    finished = subprocess.run([sys.executable, str(WORKER), arch], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    failed = {name: error for name, error in report["errors"].items() if error}
    assert not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())
    assert report["ptx_files"] and report["ptx_targets"] == [arch], report  # the PTX kept is for the target
