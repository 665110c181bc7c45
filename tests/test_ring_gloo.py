"""The ring on W gloo processes (torch.distributed point-to-point) against an fp64 full-sequence reference."""

import pytest
import torch

import fa4_cp
from gloo import run_gloo
from oracle import (
    CASES,
    TENSORS,
    assert_flash_rule,
    errors_against,
    make_inputs,
    padding_slots,
    reference_results,
    ring_results_for_rank,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ring_cases(rank: int, world_size: int) -> dict:
    """Every case and dtype on this rank; rank 0 reports the errors after an all-gather unshard."""
    torch.use_deterministic_algorithms(True)  # torch.empty is NaN-filled: unwritten outputs show
    report = {}
    for case in CASES:
        for dtype_name, dtype in DTYPES.items():
            inputs = make_inputs(case, world_size, dtype, seed=100 * world_size + len(case.name))
            local = ring_results_for_rank(case, world_size, inputs, None, rank)
            padding = padding_slots(case, world_size, rank)
            clean_padding = all((local[n][..., padding, :, :] == 0).all() for n in ("out", "dq", "dk", "dv"))
            clean_padding &= bool((local["lse"][..., padding] == float("-inf")).all())
            full = {
                name: fa4_cp.unshard(
                    local[name],
                    seq_dim=-1 if name == "lse" else (0 if case.documents else 1),
                    layout=case.layout,
                    cu_seqlens=inputs.cu_seqlens,
                )
                for name in TENSORS
            }
            entry = {"clean_padding": clean_padding}
            if rank == 0:
                truth = reference_results(case, world_size, inputs, torch.float64)
                entry["errors"] = errors_against(truth, full)
                entry["baseline"] = errors_against(truth, reference_results(case, world_size, inputs, dtype))
            report[(case.name, dtype_name)] = entry
    return report


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_on_gloo_matches_fp64_reference(world_size, tmp_path):
    outcomes = run_gloo(ring_cases, world_size, tmp_path, timeout=300)
    for rank, (status, value) in enumerate(outcomes):
        assert status == "ok", f"rank {rank} failed:\n{value}"
    for (case_name, dtype_name), entry in outcomes[0][1].items():
        assert_flash_rule(entry["errors"], entry["baseline"], DTYPES[dtype_name], f"{case_name} {dtype_name} W={world_size}")
    for rank, (_, report) in enumerate(outcomes):
        dirty = [key for key, entry in report.items() if not entry["clean_padding"]]
        assert not dirty, f"rank {rank}: padding not exactly 0 (lse -inf) in {dirty}"


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
    assert run_gloo(mesh_versus_process_group, 2, tmp_path, timeout=120) == [("ok", True), ("ok", True)]
