"""The ring on real GPUs, one process per GPU: FA4 backend, copy-engine and NCCL transports.

Every result (out, lse, dq, dk, dv) is held to FlashAttention's rule against fp64, with upstream
FA4 on the full sequence on one device as the baseline. Then 1000 consecutive calls must finish
(no hang), and a rank that fails mid-ring must make the others exit with the watchdog's error
within the ring timeout.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

if not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and torch.cuda.get_device_capability()[0] in (9, 10)):
    pytest.skip("needs 2 or more Hopper/Blackwell GPUs", allow_module_level=True)
pytest.importorskip("flash_attn.cute")

from oracle import CASES_BY_NAME, assert_ring_matches, errors_against, make_inputs, on_cuda, reference_results, ring_results_for_rank  # noqa: E402
from ranks import run_ranks, values  # noqa: E402

TRANSPORTS = ("copy_engine", "nccl")
CASE_NAMES = ("causal_zigzag", "full_zigzag", "gqa_half_kv_heads", "window_causal", "varlen_causal", "varlen_full_gqa")
# d = 128 and 128-token chunks (q slices on FA4 tile boundaries), plus a causal case with chunks
# of 100 tokens (unaligned slices, their own dq accumulators).
MULTI_GPU_CASES = [dataclasses.replace(CASES_BY_NAME[name], head_dim=128, chunk=128, batch=1) for name in CASE_NAMES]
MULTI_GPU_CASES.append(dataclasses.replace(CASES_BY_NAME["causal_zigzag"], name="causal_zigzag_unaligned", head_dim=128, chunk=100, batch=2))
DTYPE = torch.bfloat16
WORLD_SIZES = [w for w in (2, 3, 4) if w <= torch.cuda.device_count()]
CORRECTNESS_WORLD_SIZES = [w for w in (2, 4) if w <= torch.cuda.device_count()]


def _correctness_rank(rank: int, world_size: int) -> dict:
    """Local results of every case over both transports, and rank 0's upstream baseline."""
    from fa4_baseline import upstream_results

    results = {}
    for case in MULTI_GPU_CASES:
        inputs = make_inputs(case, world_size, DTYPE, seed=world_size)
        if rank == 0:
            results[(case.name, "baseline")] = upstream_results(case, world_size, inputs, DTYPE)
        for transport in TRANSPORTS:
            local = ring_results_for_rank(case, world_size, on_cuda(inputs), None, rank, backend="fa4", transport=transport)
            results[(case.name, transport)] = {name: t.cpu() for name, t in local.items()}
    return results


@pytest.mark.parametrize("world_size", CORRECTNESS_WORLD_SIZES)
def test_ring_matches_fp64_on_both_transports(world_size, tmp_path):
    per_rank = values(run_ranks(_correctness_rank, world_size, tmp_path, backend="nccl", timeout=600, pg_timeout=120))
    for case in MULTI_GPU_CASES:
        inputs = make_inputs(case, world_size, DTYPE, seed=world_size)
        truth = reference_results(case, world_size, inputs, torch.float64)
        baseline = errors_against(truth, per_rank[0][(case.name, "baseline")])
        for transport in TRANSPORTS:
            assert_ring_matches(case, world_size, inputs, DTYPE, [local[(case.name, transport)] for local in per_rank], baseline)


def _many_calls_rank(rank: int, world_size: int, calls: int) -> dict:
    """`calls` forward+backward calls per transport; the last call's output must equal the first's."""
    import fa4_cp

    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], head_dim=128, chunk=128, batch=1, heads=8, kv_heads=2)
    inputs = on_cuda(make_inputs(case, world_size, DTYPE, seed=1))
    sharding = case.sharding(world_size)
    q, k, v = (sharding.shard(t, rank, 1).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    seconds = {}
    for transport in TRANSPORTS:
        first = None
        start = time.perf_counter()
        for _ in range(calls):
            out = fa4_cp.ring_attention(q, k, v, causal=True, backend="fa4", transport=transport)
            out.sum().backward()
            first = out.detach().clone() if first is None else first
        torch.cuda.synchronize()
        seconds[transport] = time.perf_counter() - start
        assert torch.equal(out, first), f"{transport}: call {calls} differs from call 1"
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        q.grad = k.grad = v.grad = None
    return seconds


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_thousand_calls_do_not_hang(world_size, tmp_path):
    seconds = values(run_ranks(_many_calls_rank, world_size, tmp_path, 1000, backend="nccl", timeout=400, pg_timeout=120))
    print(f"W={world_size}: 1000 fwd+bwd calls took", seconds[0])


class _FailingFA4:
    """The FA4 backend, except that it raises in the middle of the ring on one forward step."""

    def __init__(self, fail_on_step: int):
        from fa4_cp.kernels import get_backend

        self._inner = get_backend("fa4")
        self.name = self._inner.name
        self.forward_steps = 0
        self.fail_at = fail_on_step

    def forward(self, q, k, *, softmax_scale):
        inner, backend = self._inner.forward(q, k, softmax_scale=softmax_scale), self

        class Failing:
            writes_rounded_varlen = inner.writes_rounded_varlen

            def step(self, *args, **kwargs):
                backend.forward_steps += 1
                if backend.forward_steps == backend.fail_at:
                    raise RuntimeError("deliberate failure in the middle of the ring")
                return inner.step(*args, **kwargs)

        return Failing()

    def backward(self, *args, **kwargs):
        return self._inner.backward(*args, **kwargs)


def _faulty_rank(rank: int, world_size: int, transport: str, failure: str) -> str:
    import fa4_cp

    q = torch.randn(1, 4096, 8, 128, device="cuda", dtype=DTYPE)
    backend = _FailingFA4(fail_on_step=20) if rank == 1 else "fa4"
    try:
        for _ in range(50):
            fa4_cp.ring_attention(q, q[:, :, :2], q[:, :, :2], causal=True, backend=backend, transport=transport)
        torch.cuda.synchronize()
    except RuntimeError:
        if failure == "stays_alive":
            time.sleep(25)  # well past the survivors' ring timeout
        raise
    return "finished"


@pytest.mark.parametrize("transport,failure", [("copy_engine", "stays_alive"), ("copy_engine", "exits"), ("nccl", "stays_alive")])
def test_a_failing_rank_makes_the_others_exit_with_a_clear_error(transport, failure, tmp_path):
    from fa4_cp.comm.watchdog import EXIT_CODE

    ring_timeout, world_size = 5, 2
    start = time.monotonic()
    outcomes = run_ranks(
        _faulty_rank, world_size, tmp_path, transport, failure,
        backend="nccl", timeout=120, pg_timeout=300, env={"FA4_CP_RING_TIMEOUT": str(ring_timeout)},
    )
    elapsed = time.monotonic() - start
    survivor = outcomes[0]
    assert survivor.exitcode == EXIT_CODE, (survivor.status, survivor.exitcode, survivor.stderr[-3000:])
    assert "fa4_cp ring timeout: rank 0 of 2" in survivor.stderr
    assert elapsed < 100
