"""The ring on W gloo processes (torch.distributed point-to-point) against an fp64 full-sequence reference."""

import pytest
import torch

from oracle import CASES, DTYPES, TENSORS, assert_ring_matches, make_inputs, ring_results_for_rank
from ranks import run_ranks, values


def seed_of(case, world_size: int) -> int:
    return 100 * world_size + len(case.name)


def ring_cases(rank: int, world_size: int) -> dict:
    """This rank's local results of every case and dtype."""
    torch.use_deterministic_algorithms(True)  # torch.empty is NaN-filled: unwritten outputs show
    return {
        (case.name, dtype_name): ring_results_for_rank(case, world_size, make_inputs(case, world_size, dtype, seed_of(case, world_size)), None, rank)
        for case in CASES
        for dtype_name, dtype in DTYPES.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_on_gloo_matches_fp64_reference(world_size, tmp_path):
    per_rank = values(run_ranks(ring_cases, world_size, tmp_path, timeout=300))
    for case in CASES:
        for dtype_name, dtype in DTYPES.items():
            inputs = make_inputs(case, world_size, dtype, seed_of(case, world_size))
            assert_ring_matches(case, world_size, inputs, dtype, [local[(case.name, dtype_name)] for local in per_rank])


def mesh_versus_process_group(rank: int, world_size: int) -> bool:
    """The ring on a 2-D DeviceMesh's "cp" dim gives bit-identical results to its process group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "cp"))
    case = CASES[0]
    inputs = make_inputs(case, world_size, torch.float32, seed=3)
    by_mesh = ring_results_for_rank(case, world_size, inputs, mesh["cp"], rank)
    by_group = ring_results_for_rank(case, world_size, inputs, mesh.get_group("cp"), rank)
    return all(torch.equal(by_mesh[name], by_group[name]) for name in TENSORS)


@pytest.mark.slow
def test_ring_runs_on_a_device_mesh_dimension(tmp_path):
    assert values(run_ranks(mesh_versus_process_group, 2, tmp_path, timeout=120)) == [True, True]
