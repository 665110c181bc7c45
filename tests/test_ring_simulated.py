"""The ring on W virtual ranks in one process (reference backend) against an fp64 full-sequence reference."""

import dataclasses

import pytest
import torch

from fa4_cp import SimulatedRing
from oracle import (
    CASES,
    CASES_BY_NAME,
    TENSORS,
    assert_flash_rule,
    errors_against,
    make_inputs,
    padding_slots,
    reference_results,
    ring_results_for_rank,
    unshard_results,
)

WORLD_SIZES = [1, 2, 4, 8, 16, 72]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# W = 72 runs every case in fp32 (the tight tolerance); bf16 at W = 72 is the growth test below.
RUNS = [(world, name) for world in WORLD_SIZES for name in DTYPES if world < 72 or name == "fp32"]


def run_simulated(case, world_size, inputs):
    per_rank = SimulatedRing(world_size).run(lambda group: ring_results_for_rank(case, world_size, inputs, group, group.rank))
    return per_rank, unshard_results(case, world_size, per_rank)


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize(("world_size", "dtype_name"), RUNS, ids=[f"W{w}-{d}" for w, d in RUNS])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ring_matches_fp64_reference(case, world_size, dtype_name):
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case, world_size, dtype, seed=1000 * world_size + len(case.name))
    truth = reference_results(case, world_size, inputs, torch.float64)
    baseline = errors_against(truth, reference_results(case, world_size, inputs, dtype))
    per_rank, results = run_simulated(case, world_size, inputs)
    assert_flash_rule(errors_against(truth, results), baseline, dtype, f"{case.name} W={world_size}")
    for rank, local in enumerate(per_rank):
        padding = padding_slots(case, world_size, rank)
        for name in ("out", "dq", "dk", "dv"):
            assert not local[name].isnan().any(), f"rank {rank} {name} has NaN"
            assert (local[name][..., padding, :, :] == 0).all(), f"rank {rank}: {name} is not exactly 0 on padding"
        assert (local["lse"][..., padding] == float("-inf")).all(), f"rank {rank}: lse of padding is not -inf"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_error_does_not_grow_with_ring_size(dtype, record_property):
    """The same tokens on 1 and on 72 ranks: each error within 1.1x of the single-rank error."""
    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], fixed_seq_len=4 * 144)
    inputs = make_inputs(case, 72, dtype, seed=7)
    truth = reference_results(case, 72, inputs, torch.float64)
    errors = {world: errors_against(truth, run_simulated(case, world, inputs)[1]) for world in (1, 72)}
    for name in TENSORS:
        record_property(f"{name}_ratio_w72_over_w1", errors[72][name] / errors[1][name])
        assert errors[72][name] <= 1.1 * errors[1][name], f"{name}: W=72 error {errors[72][name]:.3e} vs W=1 {errors[1][name]:.3e}"
