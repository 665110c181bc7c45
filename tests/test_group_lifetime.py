"""The ring's group cache never keeps a destroyed process group alive: a gloo group whose threads
outlive the interpreter aborts the process at exit ("terminate called without an active
exception", seen in the accelerate example about one run in eight)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROCESS = """
import atexit, sys, weakref
import torch, torch.distributed as dist

watched = {}

def report(name):
    print(name, "released" if watched[name]() is None else "held", flush=True)

# Registered before fa4_cp is imported, so it runs after fa4_cp's own exit hook (last in, first out).
atexit.register(report, "at_exit")

def ring_on_a_new_world(name, on_a_subgroup):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{sys.argv[1]}.{name}")
    group = dist.new_group([0]) if on_a_subgroup else dist.group.WORLD  # a name the next world does not reuse
    watched[name] = weakref.ref(group)
    resolve_group(group).transport("auto", torch.device("cpu"))
    del group
    dist.destroy_process_group()

from fa4_cp.comm.group import resolve_group

ring_on_a_new_world("after_a_new_resolve", on_a_subgroup=True)
ring_on_a_new_world("at_exit", on_a_subgroup=False)
report("after_a_new_resolve")
if sys.argv[2] == "transformers":  # a group bound to a registered attention is released at exit too
    from fa4_cp.integrations.transformers import register_ring_attention

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{sys.argv[1]}.registered")
    watched["at_exit"] = weakref.ref(dist.group.WORLD)
    register_ring_attention(group=dist.group.WORLD)
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("registers", ["nothing", "transformers"])
def test_destroyed_groups_are_released_by_the_next_resolve_and_at_exit(tmp_path, registers):
    if registers == "transformers":
        pytest.importorskip("transformers")
    finished = subprocess.run(
        [sys.executable, "-c", PROCESS, str(tmp_path / "store"), registers], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.split() == ["after_a_new_resolve", "released", "at_exit", "released"], finished.stdout
