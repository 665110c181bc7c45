"""The FA4 backend on one device: backward per mask kind and the stand-alone merge kernel, against fp64."""

import math

import pytest
import torch

from fa4_cp.kernels import BandMask, get_backend
from fa4_cp.kernels.merge import merge_partials_
from fa4_baseline import upstream_kv
from oracle import band_matrix, lse_loss, max_error

if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)):
    pytest.skip("needs a Hopper or Blackwell GPU", allow_module_level=True)
pytest.importorskip("flash_attn.cute")
from flash_attn.cute import flash_attn_func  # noqa: E402

from fa4_cp.kernels.fa4.backend import FA4Backend  # noqa: E402
from fa4_cp.kernels.fa4.masks import fa4_window  # noqa: E402
from fa4_cp.kernels.fa4.merge_kernel import merge_partials_cuda  # noqa: E402

MASKS = {
    "full": BandMask(),
    "causal": BandMask(hi=0),
    "causal_shifted_diagonal": BandMask(hi=-64),
    "causal_shifted_right": BandMask(hi=100),
    "window": BandMask(lo=-200, hi=0),
    "window_both_sides": BandMask(lo=-150, hi=90),
}


def fp64_attention(q, k, v, mask, scale):
    """out, lse and grads by autograd in fp64 on explicit scores; GQA by repeating k, v."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    kr, vr = (t.repeat_interleave(group, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    scores = scores.masked_fill(~band_matrix(q.shape[1], k.shape[1], mask.lo, mask.hi, q.device), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vr), lse, (q, k, v)


def grads_of(out, lse, leaves, dout, dlse):
    loss = (out * dout.to(out.dtype)).sum() + lse_loss(lse, dlse)
    return torch.autograd.grad(loss, leaves)


def truth_and_upstream(q, k, v, dout, dlse, mask, scale):
    """fp64's and upstream FA4's out, lse, dq, dk, dv of one attention on the same 16-bit inputs."""
    out64, lse64, leaves = fp64_attention(q, k, v, mask, scale)
    truth = {"out": out64, "lse": lse64, **dict(zip(("dq", "dk", "dv"), grads_of(out64, lse64, leaves, dout, dlse)))}
    window = fa4_window(mask, q.shape[1], k.shape[1])
    up_q, up_k, up_v = (t.clone().requires_grad_() for t in (q, k, v))
    up_k, up_v, kv_grad = upstream_kv(up_q, up_k, up_v)
    leaves = [up_q, up_k, up_v]
    up_out, up_lse = flash_attn_func(*leaves, softmax_scale=scale, causal=window.causal, window_size=(window.left, window.right), return_lse=True)
    up_dq, up_dk, up_dv = grads_of(up_out.float(), up_lse, leaves, dout, dlse)
    return truth, {"out": up_out, "lse": up_lse, "dq": up_dq, "dk": kv_grad(up_dk), "dv": kv_grad(up_dv)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "dim,dim_v,heads,kv_heads", [(64, 64, 8, 8), (128, 128, 8, 8), (128, 128, 8, 2), (64, 64, 8, 1), (192, 192, 8, 2), (256, 256, 8, 8), (256, 256, 8, 2), (192, 128, 8, 8), (192, 128, 8, 2)],
)
@pytest.mark.parametrize("mask_name", MASKS)
def test_backward_against_fp64(mask_name, dim, dim_v, heads, kv_heads, dtype):
    """One block's forward and backward through the backend, against fp64, by the 2x rule
    relative to upstream FA4 with the same mask. Two q halves in two steps share the pass."""
    check_backward(mask_name, dim, dim_v, heads, kv_heads, dtype)


SOLE_BLOCK_CASES = [
    ("causal", 128, torch.bfloat16), ("full", 128, torch.bfloat16), ("causal_shifted_diagonal", 128, torch.bfloat16),
    ("window_both_sides", 128, torch.bfloat16), ("causal", 128, torch.float16), ("causal", 64, torch.bfloat16),
    ("window", 256, torch.bfloat16), ("causal", 192, torch.bfloat16),
]


@pytest.mark.parametrize("mask_name,dim,dtype", SOLE_BLOCK_CASES, ids=[f"{m}-{d}-{str(t)[6:]}" for m, d, t in SOLE_BLOCK_CASES])
def test_sole_block_writes_finished_dkv_against_fp64(mask_name, dim, dtype):
    """A ring of one, or a call whose only block is the rank's own K and V: upstream's own epilogue
    writes dK (scaled) and dV in the inputs' dtype (`write_rounded`, one q head per kv head) into
    NaN-poisoned tensors, against fp64 by the 2x rule relative to upstream."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper backward")
    check_backward(mask_name, dim, dim, 8, 8, dtype, sole_block=True)


def check_backward(mask_name, dim, dim_v, heads, kv_heads, dtype, sole_block=False):
    torch.manual_seed(dim + dim_v + heads + kv_heads)
    mask, seq, scale = MASKS[mask_name], 1000, dim**-0.5
    q = torch.randn(2, seq, heads, dim, device="cuda", dtype=dtype)
    k = torch.randn(2, seq, kv_heads, dim, device="cuda", dtype=dtype)
    v = torch.randn(2, seq, kv_heads, dim_v, device="cuda", dtype=dtype)
    dout, dlse = torch.randn(2, seq, heads, dim_v, device="cuda", dtype=dtype), torch.randn(2, heads, seq, device="cuda")
    truth, upstream = truth_and_upstream(q, k, v, dout, dlse, mask, scale)

    backend = FA4Backend()
    out = torch.full(dout.shape, math.nan, dtype=torch.float32, device="cuda")
    lse = torch.full((2, heads, seq), math.nan, dtype=torch.float64, device="cuda")
    backend.forward(q, k, softmax_scale=scale).step(q, k, v, out, lse, mask=mask, accumulate=False)
    out16 = out.to(dtype)
    grads = backend.backward(q, out16, lse, dout, dlse, softmax_scale=scale)
    if sole_block:
        assert grads.can_write_rounded(k)
        dk, dv = (torch.full(t.shape, math.nan, dtype=dtype, device="cuda") for t in (k, v))
        grads.step(k, v, dk, dv, q_rows=slice(None), mask=mask, write_rounded=True)
        ours = {"out": out, "lse": lse, "dq": grads.dq(), "dk": dk, "dv": dv}
    else:
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device="cuda") for t in (k, v))
        half = 448  # a tile boundary for 64-row tiles, not for 128-row ones
        for rows in (slice(0, half), slice(half, seq)):
            shifted = BandMask(None if mask.lo is None else mask.lo + rows.start, None if mask.hi is None else mask.hi + rows.start)
            grads.step(k, v, dk, dv, q_rows=rows, mask=shifted)
        ours = {"out": out, "lse": lse, "dq": grads.dq(), "dk": dk * grads.dk_scale, "dv": dv}
    atol = {"out": 1e-3, "lse": 1e-5, "dq": 1e-3, "dk": 1e-3, "dv": 1e-3}
    for name in ours:
        bound = 2 * max_error(upstream[name], truth[name]) + atol[name]
        assert max_error(ours[name], truth[name]) <= bound, f"{name}: {max_error(ours[name], truth[name]):.3e} > {bound:.3e}"


@pytest.mark.parametrize("mask_name", ["causal", "window"])
def test_mla_forward_against_fp64(mask_name):
    """q and k of head_dim 192, v of 128 (DeepSeek-V3's MLA) through the Hopper forward pass, two
    steps merging in its epilogue, against fp64 by the 2x rule relative to upstream FA4."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper forward pass")
    from fa4_cp.kernels.fa4.forward_pass_sm90 import Sm90ForwardPass

    torch.manual_seed(5)
    mask, seq, scale = MASKS[mask_name], 1000, 192**-0.5
    q = torch.randn(2, seq, 8, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, seq, 8, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, seq, 8, 128, device="cuda", dtype=torch.bfloat16)
    out64, lse64, _ = fp64_attention(q, k, v, mask, scale)
    window = fa4_window(mask, seq, seq)
    up_out, up_lse = flash_attn_func(q, k, v, softmax_scale=scale, causal=window.causal, window_size=(window.left, window.right), return_lse=True)
    out = torch.full((2, seq, 8, 128), math.nan, dtype=torch.float32, device="cuda")
    lse = torch.full((2, 8, seq), math.nan, dtype=torch.float64, device="cuda")
    forward = Sm90ForwardPass(q, k, scale)
    half = 512  # two kv halves, the second merged into the first's partials
    for first, kv in ((True, slice(0, half)), (False, slice(half, seq))):
        # key j of the slice is key j + start of the sequence: the band moves left by start
        shifted = BandMask(None if mask.lo is None else mask.lo - kv.start, None if mask.hi is None else mask.hi - kv.start)
        forward.step(q, k[:, kv], v[:, kv], out, lse, mask=shifted, accumulate=not first)
    for name, ours, upstream, truth in (("out", out, up_out, out64), ("lse", lse, up_lse, lse64)):
        bound = 2 * max_error(upstream, truth) + 1e-3
        assert max_error(ours, truth) <= bound, f"{name}: {max_error(ours, truth):.3e} > {bound:.3e}"


def test_rows_with_no_visible_key_backward():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    backend = FA4Backend()
    out = torch.full(q.shape, math.nan, dtype=torch.float32, device="cuda")
    lse = torch.full((1, 4, 256), math.nan, dtype=torch.float64, device="cuda")
    backend.forward(q, k, softmax_scale=0.1).step(q, k, v, out, lse, mask=BandMask(hi=-300), accumulate=False)
    assert (out == 0).all() and (lse == -math.inf).all()
    grads = backend.backward(q, out.to(q.dtype), lse, torch.randn_like(q), None, softmax_scale=0.1)
    dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device="cuda") for t in (k, v))
    grads.step(k, v, dk, dv, q_rows=slice(None), mask=BandMask(hi=-300))
    for grad in (grads.dq(), dk, dv):
        assert not grad.isnan().any() and (grad == 0).all()


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_merge_kernel_matches_reference_merge(dim):
    """The stand-alone kernel against the PyTorch merge, fp64, including -inf rows on either side;
    an accumulator row whose lse is -inf holds no out yet (NaN here) and is not read."""
    torch.manual_seed(dim)
    shape = (2, 333, 6, dim)
    out_acc = torch.randn(shape, device="cuda")
    lse_acc = torch.randn(2, 6, 333, device="cuda", dtype=torch.float64) * 5
    out = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(2, 6, 333, device="cuda") * 5
    lse_acc[:, :, :10] = -math.inf
    out_acc[:, :10] = float("nan")
    lse[:, :, 5:20] = -math.inf
    expected_out, expected_lse = out_acc.double(), lse_acc.clone()
    merge_partials_(expected_out, expected_lse.transpose(-1, -2), out.double(), lse.double().transpose(-1, -2))
    merge_partials_cuda(out, lse, out_acc, lse_acc)
    assert torch.equal(torch.isinf(lse_acc), torch.isinf(expected_lse)) and not out_acc.isnan().any()
    assert max_error(out_acc, expected_out) < 1e-5
    finite = torch.isfinite(expected_lse)
    assert max_error(lse_acc[finite], expected_lse[finite]) < 1e-12


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("sides", [1, 3])
def test_varlen_dq_read_back_matches_untiled_sum(dim, sides):
    """The one-pass read-back against un-tiling each side in torch and summing in fp64: sides whose
    sequences start mid-tile and overlap, rows no side selects (zeros), a NaN-poisoned output."""
    from fa4_cp.kernels.fa4.backward_pass_sm90 import SM90, _dq_geometry
    from fa4_cp.kernels.fa4.varlen_dq import computed_row_map
    from fa4_cp.kernels.fa4.backward_sm90 import BackwardTiles
    from fa4_cp.kernels.fa4.dq_readback import read_back_dq
    from fa4_cp.kernels.fa4.tiled_accumulator import tile_order

    torch.manual_seed(dim + sides)
    geometry, total, heads = _dq_geometry(BackwardTiles.for_head_dim(dim)), 1000, 6
    order = tile_order(geometry, SM90, torch.device("cuda"))
    layouts = [([0, 300, 1000], [280, 700]), ([0, 50, 300, 517, 1000], [40, 0, 200, 483]), ([0, 300, 700, 1000], [0, 390, 250])]
    accumulators, row_maps = [], []
    expected = torch.zeros(total, heads, dim, dtype=torch.float64, device="cuda")
    for bounds, used in layouts[:sides]:
        cu, used = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in (bounds, used))
        padded = geometry.varlen_padded_rows(total, len(used))
        accum = torch.randn(heads, padded * geometry.head_dim_rounded, device="cuda")
        row_map = computed_row_map(cu.long(), used.long(), geometry.tile, total)
        selected = (row_map >= 0).nonzero().squeeze(1)
        values = geometry.untile(accum, order)[:, row_map[selected].long()]
        expected[selected] += values.transpose(0, 1).double()
        accumulators.append(accum)
        row_maps.append(row_map)
    dq = torch.full((total, heads, dim), math.nan, dtype=torch.bfloat16, device="cuda")
    read_back_dq(accumulators, torch.stack(row_maps), order.to(torch.int32), geometry, 0.125, dq)
    assert not dq.isnan().any()
    assert max_error(dq, expected * 0.125) <= 2**-8 * 0.125 * float(expected.abs().max())  # one bf16 rounding
    assert (dq[(torch.stack(row_maps) < 0).all(0)] == 0).all()


@pytest.mark.parametrize("shape", [(2, 300, 3, 128), (517, 2, 64)], ids=["dense", "varlen"])
@pytest.mark.parametrize("has_local,travelled", [(True, 2), (True, 1), (True, 0), (False, 2), (False, 1)])
def test_dkv_finish_matches_torch(shape, has_local, travelled):
    """The one-pass dK/dV finish against the torch one in fp64: chains over the first rows only
    (the rest local or zero), chains in wider buffers (strided rows), a NaN-poisoned buffer row
    past the travelled ones that must not be read."""
    from fa4_cp.kernels.fa4.dkv_finish import finish_dkv_cuda

    torch.manual_seed(len(shape) + 3 * travelled + has_local)
    k = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    rows = shape[-3]
    travel = rows if not has_local and travelled == 1 else rows - 37
    local = torch.randn(2, *shape, device="cuda") if has_local else None
    buffers = [torch.randn(2, *shape[:-3], rows + 11, *shape[-2:], device="cuda") for _ in range(travelled)]
    for buffer in buffers:
        buffer.narrow(-3, travel, 11 + rows - travel).fill_(math.nan)
    parts = [buffer.narrow(-3, 0, travel) for buffer in buffers]
    expected = torch.zeros(2, *shape, dtype=torch.float64, device="cuda") if local is None else local.double()
    for part in parts:
        expected.narrow(-3, 0, travel).add_(part.double())
    dk, dv = finish_dkv_cuda(local, parts, k, 0.125)
    assert dk.dtype == dv.dtype == torch.bfloat16 and dk.shape == dv.shape == k.shape
    assert max_error(dk, expected[0] * 0.125) <= 2**-8 * 0.125 * float(expected[0].abs().max())
    assert max_error(dv, expected[1]) <= 2**-8 * float(expected[1].abs().max())


@pytest.mark.parametrize("has_local", [True, False])
@pytest.mark.parametrize("chains", [1, 2, 4])
def test_dkv_finish_with_indexed_chains_matches_torch(has_local, chains):
    """Chains of streams of some rows (the balanced layout's): each a prefix of its stream, whose
    rows are some of k's in an order of their own, read through the stream's positions; rows past
    a chain's prefix hold NaN and must not be read. Against the torch finish (index_add) in fp64."""
    from fa4_cp.kernels import IndexedSums
    from fa4_cp.kernels.dkv_sum import finished_dkv
    from fa4_cp.kernels.fa4.dkv_finish import finish_dkv_cuda

    torch.manual_seed(10 * chains + has_local)
    rows, shape = 517, (517, 2, 64)
    k = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    local = torch.randn(2, *shape, device="cuda") if has_local else None
    indexed = []
    for chain in range(chains):
        stream_rows = torch.randperm(rows, device="cuda")[: 300 + 40 * chain]  # a stream's own rows, in its order
        positions = torch.full((rows,), -1, dtype=torch.int32, device="cuda")
        positions[stream_rows] = torch.arange(len(stream_rows), dtype=torch.int32, device="cuda")
        held = len(stream_rows) - 50 * (chain % 2)  # the chain's prefix
        sums = torch.randn(2, len(stream_rows) + 9, *shape[1:], device="cuda")
        sums.narrow(1, held, sums.shape[1] - held).fill_(math.nan)
        indexed.append(IndexedSums(sums.narrow(1, 0, held), stream_rows[:held], positions))
    expected = finished_dkv(
        None if local is None else local.double(), [], k.double(), k.double(), 0.125,
        dtype=torch.float64, indexed=tuple(IndexedSums(p.sums.double(), p.rows, p.positions) for p in indexed),
    )
    dk, dv = finish_dkv_cuda(local, [], k, 0.125, tuple(indexed))
    assert not dk.isnan().any() and not dv.isnan().any()
    assert max_error(dk, expected[0]) <= 2**-8 * float(expected[0].abs().max())
    assert max_error(dv, expected[1]) <= 2**-8 * float(expected[1].abs().max())


def test_auto_says_why_it_falls_back_to_the_reference():
    import warnings

    from fa4_cp import kernels

    q = torch.randn(1, 64, 2, 32, device="cuda", dtype=torch.bfloat16)  # head_dim 32: not an FA4 size
    kernels._warned.discard("head_dim must be one of (64, 96, 128, 192, 256), got 32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert get_backend("auto", q).name == get_backend(None, q).name == "reference"
        assert get_backend("auto", q.float()).name == "reference"  # fp32: the reference is expected, no warning
    assert [str(w.message) for w in caught] == [
        "fa4_cp: backend 'auto' runs the O(S^2) PyTorch reference on 16-bit CUDA inputs: head_dim must be one of (64, 96, 128, 192, 256), got 32"
    ]


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("mask_name", ["causal", "window"])
def test_entries_over_shared_kv_rows_against_fp64(mask_name, heads, kv_heads):
    """All 2g = 8 zigzag chunks of one 1000-token document in one varlen launch, each against its
    own prefix of the same K/V rows (their kv rows add up to 4.6x K's): out, lse, dq, dk, dv against
    fp64 of the whole document, by the 2x rule relative to upstream FA4 on the whole document.
    Declared without their total (upstream's grid, K's rows once), dK/dV miss tiles: checked too."""
    import dataclasses

    from oracle import PrefixEntries

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper backward")
    from fa4_cp.kernels.interface import KV_TILE_OVERHANG

    torch.manual_seed(heads + kv_heads)
    mask, seq, dim, scale = MASKS[mask_name], 1000, 128, 128**-0.5
    entries = PrefixEntries.make(seq, ranks=4)
    q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    # K and V end where their storage holds the kernel's tile overhang, finite
    k, v = (torch.zeros(seq + KV_TILE_OVERHANG, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k[:seq], v[:seq] = torch.randn(seq, kv_heads, dim), torch.randn(seq, kv_heads, dim)
    k, v = k[:seq], v[:seq]
    dout, dlse = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16), torch.randn(1, heads, seq, device="cuda")
    truth, upstream = truth_and_upstream(q, k[None], v[None], dout, dlse, mask, scale)

    order = entries.order.cuda()
    zq, zdout, zdlse = q[0, order], dout[0, order], dlse[0][:, order]
    varlen = entries.varlen("cuda")
    backend = FA4Backend()
    out = torch.full(zq.shape, math.nan, dtype=torch.float32, device="cuda")
    lse = torch.full((heads, seq), math.nan, dtype=torch.float64, device="cuda")
    backend.forward(zq, k, softmax_scale=scale).step(zq, k, v, out, lse, mask=mask, accumulate=False, varlen=varlen)

    def backward(block):
        grads = backend.backward(zq, out.to(q.dtype), lse, zdout, zdlse, softmax_scale=scale)
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device="cuda") for t in (k, v))
        grads.step(k, v, dk, dv, q_rows=slice(None), mask=mask, varlen=block)
        unzig = torch.empty_like(order)
        unzig[order] = torch.arange(seq, device="cuda")
        results = {"out": out[unzig], "lse": lse[:, unzig], "dq": grads.dq()[unzig], "dk": dk * grads.dk_scale, "dv": dv}
        return {name: value[None] for name, value in results.items()}

    ours = backward(varlen)
    atol = {"out": 1e-3, "lse": 1e-5, "dq": 1e-3, "dk": 1e-3, "dv": 1e-3}
    bounds = {name: 2 * max_error(upstream[name], truth[name]) + atol[name] for name in ours}
    for name in ours:
        assert max_error(ours[name], truth[name]) <= bounds[name], f"{name}: {max_error(ours[name], truth[name]):.3e} > {bounds[name]:.3e}"
    undeclared = backward(dataclasses.replace(varlen, shared_kv_rows=None))
    assert max_error(undeclared["dk"], truth["dk"]) > bounds["dk"], "K's rows once should miss the later entries' tiles"
