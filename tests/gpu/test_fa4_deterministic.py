"""deterministic=True with the FA4 backend: bitwise-equal gradients over runs and calls, whatever the
simulated ring's thread timing, on rings of 8 and 72 ranks and a 2-D mesh; and still right (fp64 rule).

Without the flag the kernels' atomic adds (dq across kv tiles, dK/dV across the q heads of a kv head)
land in any order; the cases have several kv tiles per block and GQA, so that they can.
"""

import dataclasses
import random
import time

import pytest
import torch

from fa4_cp import SimulatedMesh, SimulatedRing
from fa4_cp.comm import simulated
from oracle import CASES_BY_NAME, assert_ring_matches, errors_against, make_inputs, on_cuda, reference_results, ring_results_for_rank

if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
    pytest.skip("needs a Hopper GPU (the Blackwell path passes the flag to upstream)", allow_module_level=True)
pytest.importorskip("flash_attn.cute")
from fa4_baseline import upstream_results  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_memory")

GRADIENTS = ("dq", "dk", "dv")
CASES = {
    # (case, world size, ulysses): 512 rows per rank at W = 8, GQA 8:2
    "dense_gqa_w8": (dataclasses.replace(CASES_BY_NAME["gqa_half_kv_heads"], head_dim=128, heads=8, chunk=256, batch=1), 8, 1),
    "balanced_gqa_w8": (dataclasses.replace(CASES_BY_NAME["balanced_huge_gqa"], head_dim=128, heads=8, batch=1), 8, 1),
    "dense_gqa_w72": (dataclasses.replace(CASES_BY_NAME["gqa_half_kv_heads"], head_dim=64, heads=8, chunk=16, batch=1), 72, 1),
    "mesh_4x2_gqa": (dataclasses.replace(CASES_BY_NAME["causal_zigzag"], head_dim=128, heads=8, kv_heads=4, chunk=128, batch=1, ulysses=4), 8, 4),
}


def run(case, world, ulysses, inputs, deterministic: bool, jitter: bool = False) -> list[dict[str, torch.Tensor]]:
    ranks = SimulatedMesh(ulysses, world // ulysses) if ulysses > 1 else SimulatedRing(world)
    return ranks.run(lambda group: ring_results_for_rank(case, world, inputs, group, group.rank, backend="fa4", deterministic=deterministic))


@pytest.fixture
def thread_jitter(monkeypatch):
    """Random host delays at every simulated hop, so the ranks' threads interleave differently."""
    post = simulated.SimulatedRing.post
    generator = random.Random(0)

    def jittered(self, *args):
        time.sleep(generator.random() * 2e-3)
        post(self, *args)

    monkeypatch.setattr(simulated.SimulatedRing, "post", jittered)


@pytest.mark.parametrize("name", CASES)
def test_deterministic_gradients_are_bitwise_equal_across_runs(name, thread_jitter):
    case, world, ulysses = CASES[name]
    inputs = make_inputs(case, world, torch.bfloat16, seed=world)
    gpu_inputs = on_cuda(inputs)
    first = run(case, world, ulysses, gpu_inputs, deterministic=True)
    for _ in range(2):
        again = run(case, world, ulysses, gpu_inputs, deterministic=True)
        for rank, (a, b) in enumerate(zip(first, again)):
            for grad in GRADIENTS:
                assert torch.equal(a[grad], b[grad]), f"rank {rank} {grad}: differs between runs"
    truth = reference_results(case, world, inputs, torch.float64)
    baseline = errors_against(truth, upstream_results(case, world, inputs, torch.bfloat16))
    assert_ring_matches(case, world, inputs, torch.bfloat16, first, baseline)
    default = run(case, world, ulysses, gpu_inputs, deterministic=False)
    differing = sum(not torch.equal(a[g], b[g]) for a, b in zip(first, default) for g in GRADIENTS)
    print(f"{name}: {differing} of {len(GRADIENTS) * world} default-mode gradients differ bitwise from the deterministic ones")
