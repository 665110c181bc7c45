"""The multi-process harness itself (tests/ranks.py): gloo ranks, forked from a preloaded server,
still start as the caller is at the call, and a rank's failure comes back as its own."""

import os

from ranks import run_ranks, values


def environment_and_rank(rank, world_size, name):
    import torch.distributed as dist

    return os.environ.get(name), dist.get_rank(), os.getpid()


def fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return rank


def test_each_rank_sees_the_callers_environment_at_the_call(tmp_path, monkeypatch):
    """A forked rank would otherwise keep the environment of the server it was forked from, made
    at the session's first call (the FA4_CP_* settings are read at call time)."""
    for value in ("first", "second"):
        monkeypatch.setenv("FA4_CP_HARNESS_PROBE", value)
        results = values(run_ranks(environment_and_rank, 2, tmp_path, "FA4_CP_HARNESS_PROBE", env={"FA4_CP_EXTRA": "1"}))
        assert [(seen, rank) for seen, rank, _ in results] == [(value, 0), (value, 1)]
        assert len({pid for _, _, pid in results} | {os.getpid()}) == 3  # a process of its own each


def test_a_failing_rank_is_reported_with_its_error(tmp_path):
    outcomes = run_ranks(fails_on_rank_one, 2, tmp_path, timeout=60)
    assert outcomes[0].status == "ok" and outcomes[0].value == 0
    assert outcomes[1].status == "error" and "rank 1 fails on purpose" in outcomes[1].value
