"""The reference backend and the simulated ring on a CUDA device, against fp64 on the CPU."""

import dataclasses

import pytest
import torch

from fa4_cp import SimulatedRing
from oracle import CASES, CASES_BY_NAME, assert_flash_rule, errors_against, make_inputs, reference_results, ring_results_for_rank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def on_cuda(inputs):
    return dataclasses.replace(inputs, **{f.name: getattr(inputs, f.name).cuda() for f in dataclasses.fields(inputs) if getattr(inputs, f.name) is not None})


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("world_size", [2, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ring_on_cuda_matches_fp64_reference(case, world_size, dtype_name):
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case, world_size, dtype, seed=world_size)
    truth = reference_results(case, world_size, inputs, torch.float64)
    baseline = errors_against(truth, reference_results(case, world_size, inputs, dtype))
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedRing(world_size).run(lambda group: ring_results_for_rank(case, world_size, gpu_inputs, group, group.rank, backend="reference"))
    assert all(t.is_cuda for result in per_rank for t in result.values())
    sharding = case.sharding(world_size)
    seq_dim = 0 if case.documents else 1
    results = {
        name: sharding.unshard([r[name].cpu() for r in per_rank], seq_dim=-1 if name == "lse" else seq_dim)
        for name in truth
    }
    assert_flash_rule(errors_against(truth, results), baseline, dtype, f"cuda {case.name} W={world_size}")


def test_72_ranks_on_one_gpu():
    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], fixed_seq_len=4 * 144)
    inputs = make_inputs(case, 72, torch.bfloat16, seed=7)
    truth = reference_results(case, 72, inputs, torch.float64)
    baseline = errors_against(truth, reference_results(case, 72, inputs, torch.bfloat16))
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedRing(72).run(lambda group: ring_results_for_rank(case, 72, gpu_inputs, group, group.rank, backend="reference"))
    sharding = case.sharding(72)
    results = {name: sharding.unshard([r[name].cpu() for r in per_rank], seq_dim=-1 if name == "lse" else 1) for name in truth}
    assert_flash_rule(errors_against(truth, results), baseline, torch.bfloat16, "cuda W=72")
