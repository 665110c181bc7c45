"""FA4 Hopper forward with LSE partials merged in its epilogue, against fp64 (needs sm90 and flash-attn-4)."""

import math

import pytest
import torch

from fa4_cp.kernels import LSE_ACCUMULATOR_DTYPE, BandMask, ReferenceBackend, VarlenRows

if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
    pytest.skip("needs a Hopper GPU", allow_module_level=True)
pytest.importorskip("flash_attn.cute")
from flash_attn.cute import flash_attn_func  # noqa: E402

from fa4_cp.kernels.fa4.forward_pass_sm90 import forward_partials_sm90  # noqa: E402
from oracle import max_error  # noqa: E402

REFERENCE = ReferenceBackend()


def lse_shape(q):
    return (*q.shape[:-3], q.shape[-2], q.shape[-3])


def truth(q, k, v, mask, scale, varlen=None):
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full(lse_shape(q), -math.inf, dtype=torch.float64, device=q.device)
    q, k, v = q.double(), k.double(), v.double()
    REFERENCE.forward(q, k, softmax_scale=scale).step(q, k, v, out, lse, mask=mask, accumulate=True, varlen=varlen)
    return out, lse


def poisoned(q):
    return (
        torch.full(q.shape, float("nan"), dtype=torch.float32, device=q.device),
        torch.full(lse_shape(q), float("nan"), dtype=LSE_ACCUMULATOR_DTYPE, device=q.device),
    )


def rms_error(x, reference):
    finite = torch.isfinite(reference)
    return ((x.double()[finite] - reference[finite]) ** 2).mean().sqrt().item()


def fresh(batch, seq, heads, kv_heads, dim, seq_k=None):
    shape_k = (batch, seq_k or seq, kv_heads, dim)
    return (
        torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16),
        torch.randn(*shape_k, device="cuda", dtype=torch.bfloat16),
        torch.randn(*shape_k, device="cuda", dtype=torch.bfloat16),
    )


CASES = {
    "causal": (128, 8, 8, 1024, BandMask(hi=0)),
    "full_gqa4": (128, 8, 2, 1024, BandMask()),
    "window": (64, 8, 8, 1024, BandMask(lo=-200, hi=0)),
    "causal_shifted_diagonal": (128, 8, 8, 1024, BandMask(hi=-64)),
    "causal_mqa_odd_length": (128, 8, 1, 1000, BandMask(hi=0)),
    "d192_causal": (192, 4, 4, 512, BandMask(hi=0)),
    "d256_full": (256, 4, 4, 512, BandMask()),
}


@pytest.mark.parametrize("name", CASES)
def test_write_then_split_merge_against_fp64(name):
    """Splitting the keys into 2..16 merged pieces keeps the error within 1.1x of one call. The
    merges start from an unset out (NaN) with lse -inf, as the ring's packed plans start them.

    out is compared by RMS error: its max error is set by the kernel's bf16 rounding of P in a
    few rows and moves by some 10% either way from one split to another.
    """
    torch.manual_seed(len(name))
    dim, heads, kv_heads, seq, mask = CASES[name]
    q, k, v = fresh(2, seq, heads, kv_heads, dim)
    scale = dim**-0.5
    expected_out, expected_lse = truth(q, k, v, mask, scale)
    out, lse = poisoned(q)
    forward_partials_sm90(q, k, v, out, lse, mask=mask, softmax_scale=scale, accumulate=False, varlen=None)
    if mask.lo is None and mask.hi in (None, 0):  # FlashAttention's rule against upstream FA4
        upstream_out, upstream_lse = flash_attn_func(q, k, v, causal=mask.hi == 0, return_lse=True)
        assert max_error(out, expected_out) <= 2 * max_error(upstream_out, expected_out) + 1e-4
        assert max_error(lse, expected_lse) <= 2 * max_error(upstream_lse, expected_lse) + 1e-6
    whole = {"out": rms_error(out, expected_out), "lse": max_error(lse, expected_lse)}
    for pieces in (2, 3, 8, 16):
        out.fill_(float("nan"))
        lse.fill_(-math.inf)
        bounds = [round(i * seq / pieces) for i in range(pieces + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            piece = BandMask(lo=None if mask.lo is None else mask.lo - start, hi=None if mask.hi is None else mask.hi - start)
            forward_partials_sm90(
                q, k[:, start:stop], v[:, start:stop], out, lse, mask=piece, softmax_scale=scale, accumulate=True, varlen=None
            )
        split = {"out": rms_error(out, expected_out), "lse": max_error(lse, expected_lse)}
        for tensor in ("out", "lse"):
            assert split[tensor] <= 1.1 * whole[tensor], f"{pieces} pieces: {tensor} {split[tensor]:.3e} vs unsplit {whole[tensor]:.3e}"


@pytest.mark.parametrize("name", CASES)
def test_sole_block_writes_rounded_out_against_fp64(name):
    """A ring of one, or a call whose only block is the rank's own K and V: upstream's own kernel
    writes out in q's dtype and lse in fp32 (`write_rounded`) into NaN-poisoned tensors; within the
    2x rule against fp64 of upstream's flash_attn_func where the mask is one it takes, else of the
    merging kernel rounded once."""
    from fa4_cp.kernels.fa4.forward_pass_sm90 import Sm90ForwardPass

    torch.manual_seed(3 * len(name))
    dim, heads, kv_heads, seq, mask = CASES[name]
    q, k, v = fresh(2, seq, heads, kv_heads, dim)
    scale = dim**-0.5
    expected_out, expected_lse = truth(q, k, v, mask, scale)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full(lse_shape(q), float("nan"), dtype=torch.float32, device="cuda")
    Sm90ForwardPass(q, k, scale).step(q, k, v, out, lse, mask=mask, accumulate=False, write_rounded=True)
    if mask.lo is None and mask.hi in (None, 0):
        baseline_out, baseline_lse = flash_attn_func(q, k, v, causal=mask.hi == 0, return_lse=True)
    else:
        baseline_out, baseline_lse = poisoned(q)
        forward_partials_sm90(q, k, v, baseline_out, baseline_lse, mask=mask, softmax_scale=scale, accumulate=False, varlen=None)
        baseline_out = baseline_out.to(q.dtype)
    assert max_error(out, expected_out) <= 2 * max_error(baseline_out, expected_out) + 1e-4
    assert max_error(lse, expected_lse) <= 2 * max_error(baseline_lse, expected_lse) + 1e-5


PACKED_CASES = {  # GQA ratios that divide the 128-row tile: dense, windowed, odd lengths, head_dim 64
    "full_gqa4": CASES["full_gqa4"],
    "causal_mqa_odd_length": CASES["causal_mqa_odd_length"],
    "window_gqa2_d64": (64, 8, 4, 1000, BandMask(lo=-200, hi=0)),
    "causal_shifted_diagonal_gqa8": (128, 16, 2, 1024, BandMask(hi=-64)),
}


@pytest.mark.parametrize("name", PACKED_CASES)
def test_packed_q_heads_against_fp64(name):
    """`pack_gqa` (forward_pass_sm90.PACK_GQA, the default): the q heads of a KV head folded into the
    merging kernel's rows, first write and then three merged key pieces into a NaN out with lse
    -inf, against fp64: within 1.1x of the unpacked kernel's error on the same inputs, no NaN."""
    torch.manual_seed(7 * len(name))
    dim, heads, kv_heads, seq, mask = PACKED_CASES[name]
    q, k, v = fresh(2, seq, heads, kv_heads, dim)
    scale = dim**-0.5
    expected_out, expected_lse = truth(q, k, v, mask, scale)
    bounds = [0, seq // 3, seq // 2, seq]
    errors = {}
    for pack_gqa in (False, True):
        out, lse = poisoned(q)
        forward_partials_sm90(q, k, v, out, lse, mask=mask, softmax_scale=scale, accumulate=False, varlen=None, pack_gqa=pack_gqa)
        whole = (rms_error(out, expected_out), max_error(lse, expected_lse))
        out.fill_(float("nan"))
        lse.fill_(-math.inf)
        for start, stop in zip(bounds, bounds[1:]):
            piece = BandMask(lo=None if mask.lo is None else mask.lo - start, hi=None if mask.hi is None else mask.hi - start)
            forward_partials_sm90(
                q, k[:, start:stop], v[:, start:stop], out, lse, mask=piece, softmax_scale=scale, accumulate=True, varlen=None,
                pack_gqa=pack_gqa,
            )
        finite = torch.isfinite(expected_lse)
        assert not out.isnan().any() and not lse[finite].isnan().any(), f"pack_gqa={pack_gqa}: NaN left"
        errors[pack_gqa] = (*whole, rms_error(out, expected_out), max_error(lse, expected_lse))
    for what, packed, unpacked in zip(("out", "lse", "merged out", "merged lse"), errors[True], errors[False]):
        assert packed <= 1.1 * unpacked + 1e-6, f"{what}: packed {packed:.3e} vs unpacked {unpacked:.3e}"


def test_rows_that_see_no_key():
    torch.manual_seed(0)
    q, k, v = fresh(1, 256, 4, 4, 128)
    out, lse = poisoned(q)
    forward_partials_sm90(q, k, v, out, lse, mask=BandMask(hi=-300), softmax_scale=0.1, accumulate=False, varlen=None)
    assert (out == 0).all() and (lse == -math.inf).all()
    out.fill_(float("nan"))
    lse.fill_(-math.inf)
    forward_partials_sm90(q, k, v, out, lse, mask=BandMask(hi=-300), softmax_scale=0.1, accumulate=True, varlen=None)
    assert (out == 0).all() and (lse == -math.inf).all(), "merging into an unset out"


@pytest.mark.parametrize("pack_gqa", [False, True], ids=["rows", "packed_q_heads"])
def test_varlen_rows_with_shifted_key_starts(pack_gqa):
    torch.manual_seed(1)
    total = 700
    q = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def rows(cu_q, cu_k, used_q, used_k):
        return VarlenRows(*(torch.tensor(x, dtype=torch.int32, device="cuda") for x in (cu_q, cu_k, used_q, used_k)))

    for mask, block in [
        (BandMask(), rows([0, 300, 450, total], [150, 350, 500, total], [300, 100, 250], [150, 50, 200])),
        (BandMask(hi=0), rows([0, 300, 450, total], [0, 300, 450, total], [280, 100, 250], [280, 100, 250])),
    ]:
        expected_out, expected_lse = truth(q, k, v, mask, 0.09, block)
        out = torch.full(q.shape, float("nan"), dtype=torch.float32, device="cuda")  # unset: lse is -inf
        lse = torch.full((8, total), -math.inf, dtype=LSE_ACCUMULATOR_DTYPE, device="cuda")
        forward_partials_sm90(q, k, v, out, lse, mask=mask, softmax_scale=0.09, accumulate=True, varlen=block, pack_gqa=pack_gqa)
        unselected = torch.ones(total, dtype=torch.bool, device="cuda")
        for start, used in zip(block.cu_seqlens_q[:-1].tolist(), block.seqused_q.tolist()):
            unselected[start : start + used] = False
        assert max_error(out[~unselected], expected_out[~unselected]) < 1e-2 and max_error(lse, expected_lse) < 1e-5
        assert out[unselected].isnan().all() and (lse[:, unselected] == -math.inf).all(), "rows no sequence selects are not touched"
