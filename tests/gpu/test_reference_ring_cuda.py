"""The reference backend and the simulated ring on a CUDA device, against fp64 on the CPU."""

import dataclasses

import pytest
import torch

from fa4_cp import SimulatedRing
from oracle import CASES, CASES_BY_NAME, DTYPES, assert_ring_matches, make_inputs, on_cuda, ring_results_for_rank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("world_size", [2, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ring_on_cuda_matches_fp64_reference(case, world_size, dtype_name):
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case, world_size, dtype, seed=world_size)
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedRing(world_size).run(lambda group: ring_results_for_rank(case, world_size, gpu_inputs, group, group.rank, backend="reference"))
    assert all(t.is_cuda for result in per_rank for t in result.values())
    assert_ring_matches(case, world_size, inputs, dtype, per_rank)


def test_72_ranks_on_one_gpu():
    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], fixed_seq_len=4 * 144)
    inputs = make_inputs(case, 72, torch.bfloat16, seed=7)
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedRing(72).run(lambda group: ring_results_for_rank(case, 72, gpu_inputs, group, group.rank, backend="reference"))
    assert_ring_matches(case, 72, inputs, torch.bfloat16, per_rank)
