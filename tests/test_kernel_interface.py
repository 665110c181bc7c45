"""The kernel interface on the reference backend: block steps, merging, masks, GQA, varlen, empty rows."""

import pytest
import torch

from fa4_cp.kernels import BandMask, ReferenceBackend, VarlenRows
from fa4_cp.kernels.merge import merge_partials_, merged_lse
from oracle import band_matrix as oracle_band, naive_attention

BACKEND = ReferenceBackend()


def band_matrix(seqlen_q: int, seqlen_k: int, mask: BandMask) -> torch.Tensor:
    return oracle_band(seqlen_q, seqlen_k, mask.lo, mask.hi)


def forward_step(q, k, v, out, lse, *, mask, softmax_scale, accumulate, varlen=None):
    """One block through a forward pass of its own."""
    BACKEND.forward(q, k, softmax_scale=softmax_scale).step(q, k, v, out, lse, mask=mask, accumulate=accumulate, varlen=varlen)


def fresh(batch=2, seq_q=24, seq_k=24, heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, seq_k, kv_heads, dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, seq_k, kv_heads, dim, generator=generator, dtype=dtype)
    return q, k, v


def poisoned_accumulators(q: torch.Tensor):
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), dtype=torch.float64)
    return out, lse


@pytest.mark.parametrize("mask", [BandMask(), BandMask(hi=0), BandMask(hi=-5), BandMask(lo=-6, hi=3)], ids=str)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_first_block_overwrites_poisoned_accumulators(mask, kv_heads):
    q, k, v = fresh(kv_heads=kv_heads)
    out, lse = poisoned_accumulators(q)
    forward_step(q, k, v, out, lse, mask=mask, softmax_scale=0.3, accumulate=False)
    expected_out, expected_lse = naive_attention(q, k, v, band_matrix(24, 24, mask), 0.3)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def shifted(mask: BandMask, shift: int) -> BandMask:
    """The same global band for a block whose keys start `shift` positions later."""
    return BandMask(lo=None if mask.lo is None else mask.lo - shift, hi=None if mask.hi is None else mask.hi - shift)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("pieces", [2, 3, 5, 16])
@pytest.mark.parametrize("mask", [BandMask(), BandMask(hi=0), BandMask(lo=-9, hi=0)], ids=str)
def test_kv_split_into_pieces_and_merged_equals_the_whole(pieces, mask, dtype):
    """fp64: the merge is exact to rounding. bf16: the returned (rounded) output is as accurate split as whole.
    The first piece merges into an unset out (NaN) whose lse is -inf: a backend must not read it."""
    q, k, v = fresh(seq_k=48, dtype=dtype, seed=pieces)
    whole = shifted(mask, -24)  # the 24 queries sit at global positions 24..47 of the 48 keys
    whole_out, whole_lse = poisoned_accumulators(q)
    forward_step(q, k, v, whole_out, whole_lse, mask=whole, softmax_scale=0.25, accumulate=False)
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    lse = torch.full((2, 4, 24), float("-inf"), dtype=torch.float64)
    bounds = torch.linspace(0, 48, pieces + 1).round().long().tolist()
    for start, stop in zip(bounds, bounds[1:]):
        piece = shifted(mask, start - 24)
        forward_step(q, k[:, start:stop], v[:, start:stop], out, lse, mask=piece, softmax_scale=0.25, accumulate=True)
    truth_out, truth_lse = naive_attention(q.double(), k.double(), v.double(), band_matrix(24, 48, whole), 0.25)
    if dtype == torch.float64:
        torch.testing.assert_close(out, truth_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, truth_lse, rtol=1e-12, atol=1e-12)
        return
    whole_error = (whole_out.to(dtype).double() - truth_out).abs().max().item()
    assert (out.to(dtype).double() - truth_out).abs().max().item() <= 1.1 * whole_error


def test_rows_that_see_no_key_get_zero_output_and_minus_infinite_lse():
    q, k, v = fresh()
    out, lse = poisoned_accumulators(q)
    forward_step(q, k, v, out, lse, mask=BandMask(hi=-30), softmax_scale=0.3, accumulate=False)
    assert (out == 0).all() and (lse == float("-inf")).all()
    # merging a block that sees nothing leaves earlier partials exactly as they were
    forward_step(q, k, v, out, lse, mask=BandMask(hi=-10), softmax_scale=0.3, accumulate=True)
    before_out, before_lse = out.clone(), lse.clone()
    forward_step(q, k, v, out, lse, mask=BandMask(hi=-30), softmax_scale=0.3, accumulate=True)
    assert torch.equal(out, before_out) and torch.equal(lse, before_lse)
    # and the backward of fully masked rows is exactly zero, without NaN
    dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (k, v))
    grads = BACKEND.backward(q, out, lse, torch.randn_like(q), None, softmax_scale=0.3)
    grads.step(k, v, dk, dv, q_rows=slice(None), mask=BandMask(hi=-10))
    grads = [grads.dq(), dk, dv]
    assert not any(g.isnan().any() for g in grads)
    assert (grads[0][:, :10] == 0).all() and (grads[1][:, 14:] == 0).all()


def test_merged_lse_is_stable_and_exact_at_the_edges():
    a = torch.tensor([1e4, -1e4, 0.0, float("-inf"), float("-inf"), 88.0], dtype=torch.float32)
    b = torch.tensor([1e4 - 1, -1e4, -200.0, 3.0, float("-inf"), 89.0], dtype=torch.float32)
    merged = merged_lse(a, b)
    expected = torch.logaddexp(a.double(), b.double())
    assert torch.equal(merged[3:5], torch.tensor([3.0, float("-inf")]))
    torch.testing.assert_close(merged.double(), expected, rtol=1e-7, atol=1e-7)
    out = torch.ones(6, 1, 2, dtype=torch.float32)
    merge_partials_(out, a.clone().view(6, 1), torch.full((6, 1, 2), 2.0), b.view(6, 1))
    assert not out.isnan().any()


@pytest.mark.parametrize("mask", [BandMask(), BandMask(hi=0)], ids=str)
def test_backward_pass_matches_autograd(mask):
    q, k, v = fresh(seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    visible = band_matrix(24, 24, mask)
    out, lse = naive_attention(q, k, v, visible, 0.4)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward((out, lse), (dout, dlse))
    dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (k, v))
    grads = BACKEND.backward(q.detach(), out.detach(), lse.detach(), dout, dlse, softmax_scale=0.4)
    # two steps over halves of the q rows accumulate into one dq
    for rows in (slice(0, 10), slice(10, None)):
        grads.step(k.detach(), v.detach(), dk, dv, q_rows=rows, mask=BandMask(lo=mask.lo, hi=None if mask.hi is None else mask.hi + rows.start))
    grads = [grads.dq(), dk, dv]
    for mine, expected in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-10)


def test_varlen_block_touches_only_selected_rows():
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(20, 4, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(20, 2, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(20, 2, 8, generator=generator, dtype=torch.float64)
    out = torch.full((20, 4, 8), float("nan"), dtype=torch.float64)
    lse = torch.full((4, 20), float("nan"), dtype=torch.float64)
    # sequence 0: q rows 0..5 vs k rows 10..13; sequence 1: q rows 12..16 vs k rows 2..8
    rows = VarlenRows(
        cu_seqlens_q=torch.tensor([0, 12, 20], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([10, 2, 20], dtype=torch.int32),
        seqused_q=torch.tensor([6, 5], dtype=torch.int32),
        seqused_k=torch.tensor([4, 7], dtype=torch.int32),
    )
    forward_step(q, k, v, out, lse, mask=BandMask(hi=0), softmax_scale=0.35, accumulate=False, varlen=rows)
    for (q0, q1), (k0, k1) in [((0, 6), (10, 14)), ((12, 17), (2, 9))]:
        expected_out, expected_lse = naive_attention(q[q0:q1], k[k0:k1], v[k0:k1], band_matrix(q1 - q0, k1 - k0, BandMask(hi=0)), 0.35)
        torch.testing.assert_close(out[q0:q1], expected_out.nan_to_num(0.0))
        torch.testing.assert_close(lse[:, q0:q1], expected_lse)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[0:6] = untouched[12:17] = False
    assert out[untouched].isnan().all() and lse[:, untouched].isnan().all()


def test_fp32_inputs_accumulate_in_fp64_and_16_bit_inputs_in_fp32():
    from fa4_cp.kernels import LSE_ACCUMULATOR_DTYPE, accumulator_dtype

    assert accumulator_dtype(torch.bfloat16) == torch.float32 == accumulator_dtype(torch.float16)
    assert accumulator_dtype(torch.float32) == torch.float64 == LSE_ACCUMULATOR_DTYPE


def test_band_from_flags_follows_flash_attention():
    assert BandMask.from_flags(False, (-1, -1)) == BandMask()
    assert BandMask.from_flags(True, (-1, -1)) == BandMask(hi=0)
    assert BandMask.from_flags(True, (128, 0)) == BandMask(lo=-128, hi=0)
    assert BandMask.from_flags(False, (3, 5)) == BandMask(lo=-3, hi=5)


@pytest.mark.parametrize("mask", [BandMask(hi=0), BandMask(lo=-40, hi=0)], ids=str)
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_entries_over_shared_kv_rows_equal_the_whole_document(mask, kv_heads):
    """All 2g zigzag chunks of one document in one varlen block, each against its own prefix of the
    same K/V rows, masks aligned at each entry's end: out, lse, dq, dk, dv (dK/dV summed over the
    entries) equal the whole document's attention, in fp64 against autograd."""
    from oracle import PrefixEntries

    entries = PrefixEntries.make(100, ranks=4)
    q, k, v = (t[0] for t in fresh(batch=1, seq_q=100, seq_k=100, kv_heads=kv_heads, seed=11))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q, k, v, band_matrix(100, 100, mask), 0.3)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward((out, lse), (dout, dlse))

    varlen, order = entries.varlen("cpu"), entries.order
    zq, zdout, zdlse = q.detach()[order], dout[order], dlse[:, order]
    zout, zlse = (torch.full(shape, float("nan"), dtype=torch.float64) for shape in (zq.shape, (4, 100)))
    BACKEND.forward(zq, k, softmax_scale=0.3).step(zq, k.detach(), v.detach(), zout, zlse, mask=mask, accumulate=False, varlen=varlen)
    torch.testing.assert_close(zout, out.detach()[order], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zlse, lse.detach()[:, order], rtol=1e-12, atol=1e-12)
    grads = BACKEND.backward(zq, zout, zlse, zdout, zdlse, softmax_scale=0.3)
    dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (k, v))
    grads.step(k.detach(), v.detach(), dk, dv, q_rows=slice(None), mask=mask, varlen=varlen)
    for mine, expected in ((grads.dq(), q.grad[order]), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-10)


def test_a_deterministic_backward_refuses_entries_over_shared_kv_rows():
    from oracle import PrefixEntries

    q, k, v = (t[0] for t in fresh(batch=1, seq_q=20, seq_k=20))
    grads = BACKEND.backward(q, q, torch.zeros(4, 20, dtype=torch.float64), q, None, softmax_scale=0.3, deterministic=True)
    with pytest.raises(ValueError, match="deterministic: varlen sequences whose kv rows overlap"):
        varlen = PrefixEntries.make(20, 2).varlen("cpu")
        grads.step(k, v, torch.zeros_like(k), torch.zeros_like(v), q_rows=slice(None), mask=BandMask(hi=0), varlen=varlen)
