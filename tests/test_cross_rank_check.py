"""A call that differs across ranks raises on every rank instead of hanging."""

import pytest
import torch

import fa4_cp
from gloo import run_gloo


def mismatched_call(rank: int, world_size: int, scenario: str) -> str:
    torch.manual_seed(rank)
    seq_local = 16 if scenario == "seq_len" and rank == 1 else 8
    causal = scenario != "causal" or rank == 0
    if scenario == "missing_rank" and rank == 1:
        return "rank 1 never calls"
    q, k, v = (torch.randn(1, seq_local, 2, 8) for _ in range(3))
    fa4_cp.ring_attention(q, k, v, causal=causal)
    return "returned"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["causal", "seq_len"])
def test_mismatched_arguments_raise_on_every_rank(scenario, tmp_path):
    outcomes = run_gloo(mismatched_call, 2, tmp_path, scenario, timeout=120)
    for rank, (status, message) in enumerate(outcomes):
        assert status == "error", f"rank {rank} returned instead of raising"
        assert "ValueError" in message and "differs across the ranks" in message


@pytest.mark.slow
def test_a_rank_that_never_calls_makes_the_other_raise_within_the_timeout(tmp_path):
    outcomes = run_gloo(mismatched_call, 2, tmp_path, "missing_rank", timeout=60, pg_timeout=5)
    assert outcomes[1] == ("ok", "rank 1 never calls")
    assert outcomes[0][0] == "error"
