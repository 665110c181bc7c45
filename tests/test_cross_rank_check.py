"""A call that differs across ranks raises on every rank instead of hanging; a rank whose input is
bad raises at once, and its peers fail within FA4_CP_RING_TIMEOUT even while it stays alive."""

import time

import pytest
import torch

import fa4_cp
from ranks import run_ranks, values

RING_TIMEOUT = 3


def mismatched_call(rank: int, world_size: int, scenario: str) -> str:
    torch.manual_seed(rank)
    seq_local = 16 if scenario == "seq_len" and rank == 1 else 8
    causal = scenario != "causal" or rank == 0
    if scenario == "missing_rank" and rank == 1:
        return "rank 1 never calls"
    if scenario == "documents":  # the same total, other boundaries on rank 1: 8 local rows on both
        cu = torch.tensor([0, 8, 16] if rank == 0 else [0, 4, 16], dtype=torch.int32)
        q, k, v = (torch.randn(8, 2, 8) for _ in range(3))
        fa4_cp.ring_attention_varlen(q, k, v, cu, causal=True, layout="zigzag")
        return "returned"
    q, k, v = (torch.randn(1, seq_local, 2, 8) for _ in range(3))
    if scenario == "window":  # a per-layer window one rank reads wrongly
        fa4_cp.ring_attention(q, k, v, causal=True, window_size=(4, 0) if rank == 0 else (-1, 0))
        return "returned"
    if scenario == "sinks":
        fa4_cp.ring_attention(q, k, v, causal=True, sinks=torch.zeros(2) if rank == 0 else None)
        return "returned"
    if scenario == "bad_window" and rank == 1:
        try:
            fa4_cp.ring_attention(q, k, v, causal=True, window_size=(4, 2))
        except ValueError as error:
            time.sleep(3 * RING_TIMEOUT)  # alive, and past the peers' ring timeout
            raise ValueError(f"after {time.monotonic()}: {error}") from error
    started = time.monotonic()
    try:
        fa4_cp.ring_attention(q, k, v, causal=causal)
    except RuntimeError as error:
        raise RuntimeError(f"after {time.monotonic() - started:.1f} s: {error}") from error
    return "returned"


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario,fields",
    [("causal", ["mask (causal, window_size) (ranks 0: BandMask(lo=None, hi=0); ranks 1: BandMask(lo=None, hi=None))"]),
     ("seq_len", ["q shape (ranks 0: (1, 8, 2, 8); ranks 1: (1, 16, 2, 8))", "k/v shape"]),
     ("window", ["mask (causal, window_size) (ranks 0: BandMask(lo=-4, hi=0); ranks 1: BandMask(lo=None, hi=0))"]),
     ("sinks", ["sinks (ranks 0: shape (2,); ranks 1: None)"]),
     ("documents", ["documents (ranks 0: 2 documents, 16 tokens, lengths [8, 8]; ranks 1: 2 documents, 16 tokens, lengths [4, 12])"])],
)
def test_mismatched_arguments_raise_on_every_rank_naming_the_fields(scenario, fields, tmp_path):
    outcomes = run_ranks(mismatched_call, 2, tmp_path, scenario, timeout=120)
    for rank, outcome in enumerate(outcomes):
        assert outcome.status == "error", f"rank {rank} {outcome.status} instead of raising"
        assert "ValueError: ring attention call differs across the ranks of the group" in outcome.value
        for field in fields:
            assert field in outcome.value, outcome.value
        assert "dtype" not in outcome.value.split("differs")[1].split(".")[0]  # fields that agree are not listed


@pytest.mark.slow
def test_a_rank_with_bad_input_raises_at_once_and_its_peer_within_the_ring_timeout(tmp_path):
    started = time.monotonic()
    outcomes = run_ranks(mismatched_call, 2, tmp_path, "bad_window", timeout=60, pg_timeout=600, env={"FA4_CP_RING_TIMEOUT": str(RING_TIMEOUT)})
    assert outcomes[1].status == "error" and "ValueError" in outcomes[1].value and "window_size: a causal mask" in outcomes[1].value
    peer = outcomes[0]
    assert peer.status == "error", (peer.status, peer.value)
    assert f"fa4_cp ring timeout: rank 0 of 2: the cross-rank check of the call did not complete within {RING_TIMEOUT} s" in peer.value
    waited = float(peer.value.split("after ")[1].split(" s:")[0])
    assert RING_TIMEOUT <= waited < RING_TIMEOUT + 5, waited
    assert time.monotonic() - started < 50


@pytest.mark.slow
def test_a_rank_that_never_calls_and_exits_is_reported_as_exited(tmp_path):
    outcomes = run_ranks(mismatched_call, 2, tmp_path, "missing_rank", timeout=60, pg_timeout=600, env={"FA4_CP_RING_TIMEOUT": str(RING_TIMEOUT)})
    assert (outcomes[1].status, outcomes[1].value) == ("ok", "rank 1 never calls")
    assert outcomes[0].status == "error", outcomes[0]
    assert "fa4_cp ring: rank 0 of 2: the cross-rank check of the call failed after" in outcomes[0].value, outcomes[0].value
    assert f"before the {RING_TIMEOUT} s timeout: a peer rank exited or closed its connection" in outcomes[0].value


def check_devices(rank: int, world_size: int) -> list[str]:
    from fa4_cp.comm.group import resolve_group

    ring = resolve_group(None)
    return [str(ring.check_device(torch.device(kind))) for kind in ("cuda", "cpu")]


def test_the_check_all_gathers_on_the_cpu_where_the_group_can(tmp_path):
    """A gloo group (alone, or beside NCCL as "cpu:gloo,cuda:nccl") checks on the host: the check
    never waits for the GPU's queued work."""
    assert values(run_ranks(check_devices, 2, tmp_path)) == [["cpu", "cpu"]] * 2
