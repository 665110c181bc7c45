"""The ring on W virtual ranks in one process (reference backend) against an fp64 full-sequence reference."""

import dataclasses
import random

import pytest
import torch

import fa4_cp
from fa4_cp import SimulatedRing
from oracle import (
    CASES,
    CASES_BY_NAME,
    DTYPES,
    TENSORS,
    assert_ring_matches,
    errors_against,
    make_inputs,
    naive_attention,
    reference_results,
    ring_results_for_rank,
    unshard_results,
)

WORLD_SIZES = [1, 2, 4, 8, 16, 72]
# W = 72 runs in fp32 (the tight tolerance); bf16 at W = 72 is the growth test below. It leaves
# out the cases whose feature does not meet the ring size (GQA, softcap and the full mask also
# run at W = 72 inside other cases: sinks_causal_gqa, softcap_sinks_balanced_gqa, varlen_full_gqa).
RUNS = [(world, name) for world in WORLD_SIZES for name in DTYPES if world < 72 or name == "fp32"]
NOT_AT_72 = {"full_zigzag", "full_contiguous", "gqa_one_kv_head", "gqa_half_kv_heads", "softcap_causal"}
CASE_RUNS = [(case, world, name) for case in CASES for world, name in RUNS if world < 72 or case.name not in NOT_AT_72]


def run_simulated(case, world_size, inputs, **kwargs):
    return SimulatedRing(world_size).run(lambda group: ring_results_for_rank(case, world_size, inputs, group, group.rank, **kwargs))


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize(("case", "world_size", "dtype_name"), CASE_RUNS, ids=[f"{c.name}-W{w}-{d}" for c, w, d in CASE_RUNS])
def test_ring_matches_fp64_reference(case, world_size, dtype_name):
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case, world_size, dtype, seed=1000 * world_size + len(case.name))
    assert_ring_matches(case, world_size, inputs, dtype, run_simulated(case, world_size, inputs))


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_a_mask_that_keeps_every_rank_to_itself_runs_one_block_per_rank(dtype_name):
    """Each token sees itself only (window (0, 0)): at W = 4 every rank's plan is its own block, which
    writes out, dK and dV finished (the sole-block path a ring of one takes), and matches fp64."""
    from fa4_cp import Sharding
    from fa4_cp.kernels import BandMask
    from fa4_cp.plan.rows import rank_plan

    case = dataclasses.replace(CASES_BY_NAME["window_causal"], name="diagonal_only", window_in_chunks=(0, 0))
    sharding = Sharding.dense(2 * 4 * case.chunk_size(4), 4, case.layout)
    assert all(rank_plan(sharding, BandMask(lo=0, hi=0), rank, torch.device("cpu")).sole_block for rank in range(4))
    inputs = make_inputs(case, 4, DTYPES[dtype_name], seed=4)
    assert_ring_matches(case, 4, inputs, DTYPES[dtype_name], run_simulated(case, 4, inputs))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_error_does_not_grow_with_ring_size(dtype, record_property):
    """The same tokens on 1 and on 72 ranks: each error within 1.1x of the single-rank error."""
    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], fixed_seq_len=4 * 144)
    inputs = make_inputs(case, 72, dtype, seed=7)
    truth = reference_results(case, 72, inputs, torch.float64)
    errors = {world: errors_against(truth, unshard_results(case, world, run_simulated(case, world, inputs))) for world in (1, 72)}
    for name in TENSORS:
        record_property(f"{name}_ratio_w72_over_w1", errors[72][name] / errors[1][name])
        assert errors[72][name] <= 1.1 * errors[1][name], f"{name}: W=72 error {errors[72][name]:.3e} vs W=1 {errors[1][name]:.3e}"


@pytest.mark.parametrize("world_size", [2, 8, 72])
def test_sinks_gradient_is_rounded_once_whatever_the_ring_size(world_size):
    """fp32 attention with bf16 sinks: the ranks' shares of ds cancel, so rounding each share to
    bf16 would cost up to W half-ulps of the shares. The ranks' ds sum to the fp64 truth within
    one bf16 rounding of the total: rank 0 holds it, the others zero."""
    case = dataclasses.replace(CASES_BY_NAME["sinks_causal_gqa"], heads=8, fixed_seq_len=4 * 144)
    inputs = make_inputs(case, world_size, torch.float32, seed=world_size)
    inputs = dataclasses.replace(inputs, sinks=inputs.sinks.to(torch.bfloat16))
    truth = reference_results(case, world_size, inputs, torch.float64)["ds"]
    per_rank = run_simulated(case, world_size, inputs)
    assert all(not r["ds"].any() for r in per_rank[1:]), "ranks past 0 return zeros"
    summed = torch.stack([r["ds"].double() for r in per_rank]).sum(0)
    one_rounding = (truth.to(torch.bfloat16).double() - truth).abs()
    half_ulp = truth.abs().to(torch.bfloat16).double() * 2.0**-8
    assert ((summed - truth).abs() <= torch.maximum(one_rounding, half_ulp) * 1.01 + 1e-5).all(), (summed - truth).abs()


@pytest.mark.parametrize("mesh", [(1, 2), (2, 2)], ids=["ring", "2x2_mesh"])
def test_a_backend_object_made_in_the_call_lives_until_the_backward(mesh):
    """fa4_cp's registry holds backend objects weakly; the autograd context must keep one alive."""
    import gc

    from fa4_cp import SimulatedMesh
    from fa4_cp.kernels import ReferenceBackend

    q, k, v = (torch.randn(1, 8, 4, 8, requires_grad=True) for _ in range(3))

    def grads(group, backend):
        out = fa4_cp.ring_attention(q, k, v, group=group, causal=True, backend=backend())
        gc.collect()
        return torch.autograd.grad(out.sum(), (q, k, v))

    for named, made in zip(*(SimulatedMesh(*mesh).run(lambda g, b=b: grads(g, b)) for b in (lambda: "reference", ReferenceBackend))):
        assert all(torch.equal(a, b) for a, b in zip(named, made))


def document_visibility(lengths: list[int], causal: bool, window: tuple[int, int]) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(len(doc)) - torch.tensor([0, *lengths]).cumsum(0)[doc]
    offset = position[None, :] - position[:, None]
    visible = doc[:, None] == doc[None, :]
    if causal:
        visible &= offset <= 0
    if window[0] >= 0:
        visible &= offset >= -window[0]
    if window[1] >= 0:
        visible &= offset <= window[1]
    return visible


@pytest.mark.parametrize("seed", range(8))
def test_balanced_streams_on_random_mixes_match_fp64(seed):
    """Random packed mixes (empty, 1-token and long documents) on 2 to 16 ranks, causal, full and
    windowed: the balanced ring's two KV streams, their shrinking hops and the dK/dV pieces that go
    home early give the fp64 reference's out, dq, dk and dv to rounding (fp64 inputs)."""
    rng = random.Random(seed)
    world = rng.choice([3, 5, 8, 16])
    lengths = [rng.choice([0, 1, 17, 90, 450, 900]) for _ in range(rng.randint(2, 5))]
    lengths[0] = lengths[0] or 50
    causal, window = rng.choice([(True, (-1, -1)), (False, (-1, -1)), (True, (rng.randint(1, 60), 0)), (False, (rng.randint(1, 60), rng.randint(1, 60)))])
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    generator = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(sum(lengths), 4, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    k, v = (torch.randn(sum(lengths), 2, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    sharding = fa4_cp.Sharding.documents(lengths, world, "balanced")

    def rank_results(group):
        local = [sharding.shard(t, group.rank, 0).requires_grad_(t is not dout) for t in (q, k, v, dout)]
        out = fa4_cp.ring_attention_varlen(*local[:3], cu_seqlens, group=group, causal=causal, window_size=window, backend="reference")
        (out * local[3]).sum().backward()
        return [out.detach(), *(t.grad for t in local[:3])]

    per_rank = SimulatedRing(world).run(rank_results)
    ring = [sharding.unshard([results[i] for results in per_rank], seq_dim=0) for i in range(4)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = naive_attention(*leaves, document_visibility(lengths, causal, window), 8**-0.5)
    (out * dout).sum().backward()
    for name, ours, truth in zip(("out", "dq", "dk", "dv"), ring, [out.detach(), *(t.grad for t in leaves)]):
        assert torch.allclose(ours, truth, rtol=0, atol=1e-10), f"{name}: {(ours - truth).abs().max():.3e} (W={world}, {lengths})"
