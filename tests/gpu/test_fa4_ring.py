"""The core's ring tests with the FA4 backend, in the simulated transport on one GPU (W = 2, 8, 72).

Every ring result (out, lse, dq, dk, dv, and ds for sinks) is held to FlashAttention's rule against fp64: its error
is at most twice the error of upstream FA4 on the full sequence on one device, plus a small atol.
"""

import dataclasses

import pytest
import torch

from fa4_cp import SimulatedRing
from oracle import CASES, CASES_BY_NAME, assert_ring_matches, errors_against, make_inputs, on_cuda, reference_results, ring_results_for_rank, visibility

if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)):
    pytest.skip("needs a Hopper or Blackwell GPU", allow_module_level=True)
pytest.importorskip("flash_attn.cute")
from fa4_baseline import upstream_results  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_memory")

# MLA's cases at its real head dims (192 / 128), the others at 64.
FA4_CASES = [dataclasses.replace(case, **({"head_dim": 64} if case.head_dim_v is None else {"head_dim": 192, "head_dim_v": 128})) for case in CASES]
# 128-token chunks: q slices start on a tile boundary and share one dq accumulator.
FA4_CASES.append(dataclasses.replace(CASES_BY_NAME["causal_zigzag"], name="causal_zigzag_tile_aligned", head_dim=128, chunk=128, batch=1))
FA4_CASES.append(dataclasses.replace(CASES_BY_NAME["gqa_half_kv_heads"], name="gqa_tile_aligned", head_dim=128, chunk=128, batch=1, causal=False))


def check_ring(case, world_size, dtype=torch.bfloat16, seed=0):
    inputs = make_inputs(case, world_size, dtype, seed=seed)
    truth = reference_results(case, world_size, inputs, torch.float64)
    assert visibility(case, world_size).any()
    baseline = errors_against(truth, upstream_results(case, world_size, inputs, dtype))
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedRing(world_size).run(
        lambda group: ring_results_for_rank(case, world_size, gpu_inputs, group, group.rank, backend="fa4")
    )
    return assert_ring_matches(case, world_size, inputs, dtype, per_rank, baseline), baseline


@pytest.mark.parametrize("world_size", [1, 2, 8])  # 1: a dense call's sole block runs upstream's own kernels
@pytest.mark.parametrize("case", FA4_CASES, ids=lambda case: case.name)
def test_fa4_ring_matches_fp64(case, world_size):
    check_ring(case, world_size, seed=world_size)


# Today's head dims beyond 128: Gemma 2 / 3 (256, sliding windows, Gemma 2's softcap) and
# DeepSeek-V3's MLA (192 / 128), dense and packed.
NEW_DIM_CASES = {
    "gemma2_softcap_window_256": dataclasses.replace(CASES_BY_NAME["sinks_window"], sinks=False, softcap=0.5, head_dim=256, kv_heads=2, batch=1),
    "gemma3_packed_window_256": dataclasses.replace(CASES_BY_NAME["varlen_window_zigzag_gqa"], head_dim=256),
    "mla_causal_gqa": dataclasses.replace(CASES_BY_NAME["mla_causal_gqa"], head_dim=192, head_dim_v=128, batch=1),
    "mla_packed_balanced": dataclasses.replace(CASES_BY_NAME["balanced_causal"], head_dim=192, head_dim_v=128, kv_heads=2),
}


@pytest.mark.parametrize("world_size", [2, 8, 72])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NEW_DIM_CASES)
def test_fa4_ring_new_head_dims(name, dtype, world_size):
    case = NEW_DIM_CASES[name]
    if world_size == 72:
        case = dataclasses.replace(case, batch=1, **({} if case.documents else {"chunk": 16}))
    check_ring(dataclasses.replace(case, name=f"{name}_{world_size}"), world_size, dtype=dtype, seed=world_size)


PACKED_Q_HEAD_CASES = [case for case in FA4_CASES if case.kv_heads < case.heads and case.head_dim_v is None]


@pytest.mark.parametrize("world_size", [2, 8])
@pytest.mark.parametrize("case", PACKED_Q_HEAD_CASES, ids=lambda case: case.name)
def test_fa4_ring_without_packed_q_heads_matches_fp64(case, world_size, monkeypatch):
    """The forward with the q heads of a KV head in rows of their own, as before PACK_GQA became the
    default (a bench's --no-pack-gqa) through the ring: GQA dense, packed documents, windows,
    softcap, sinks. The other ring tests run the default, packed."""
    from fa4_cp.kernels.fa4 import forward_pass_sm90

    monkeypatch.setattr(forward_pass_sm90, "PACK_GQA", False)
    check_ring(dataclasses.replace(case, name=f"{case.name}_unpacked_q_heads"), world_size, seed=world_size)


FINAL_ROW_CASES = [case for case in FA4_CASES if case.layout == "balanced" and not case.sinks]


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("case", FINAL_ROW_CASES, ids=lambda case: case.name)
def test_fa4_ring_with_kept_documents_merged_matches_fp64(case, world_size, monkeypatch):
    """The forward that merges the balanced layout's kept documents into the fp32 out like every
    other row, as before ROUNDED_VARLEN became the default (a bench's --no-rounded-varlen), out and
    lse poisoned. The other ring tests run the default, kept documents written finished."""
    from fa4_cp.kernels.fa4 import forward_pass_sm90

    monkeypatch.setattr(forward_pass_sm90, "ROUNDED_VARLEN", False)
    check_ring(dataclasses.replace(case, name=f"{case.name}_kept_merged"), world_size, seed=world_size)


def test_fa4_ring_fp16():
    check_ring(FA4_CASES[0], 4, dtype=torch.float16)


@pytest.mark.parametrize("name", ["causal_zigzag", "balanced_causal", "sinks_window", "sinks_balanced_window", "softcap_sinks_balanced_gqa", "varlen_window_zigzag_gqa"])
def test_fa4_ring_72_ranks_on_one_gpu(name):
    case = dataclasses.replace(CASES_BY_NAME[name], head_dim=64, batch=1, **({} if CASES_BY_NAME[name].documents else {"chunk": 16}))
    errors, baseline = check_ring(case, 72, seed=7)
    print(f"{name} W=72 errors", errors, "single-device FA4", baseline)


def check_mesh(case, ring, with_dlse=True, **options):
    """A case on a simulated case.ulysses x ring mesh with FA4, by the 2x rule against upstream;
    (errors, upstream's errors). `with_dlse`: whether the loss reads the lse too. `options`: more
    of the call's keywords."""
    from fa4_cp import SimulatedMesh

    world = case.ulysses * ring
    inputs = make_inputs(case, world, torch.bfloat16, seed=world)
    inputs = inputs if with_dlse else dataclasses.replace(inputs, dlse=None)
    truth = reference_results(case, world, inputs, torch.float64)
    baseline = errors_against(truth, upstream_results(case, world, inputs, torch.bfloat16))
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedMesh(case.ulysses, ring).run(lambda group: ring_results_for_rank(case, world, gpu_inputs, group, group.rank, backend="fa4", **options))
    return assert_ring_matches(case, world, inputs, torch.bfloat16, per_rank, baseline), baseline


@pytest.mark.parametrize(("ulysses", "ring", "name", "kv_heads"), [(2, 4, "causal_zigzag", 1), (4, 2, "balanced_window", 4), (8, 9, "causal_zigzag", 2)])
def test_fa4_on_a_simulated_ulysses_by_ring_mesh(ulysses, ring, name, kv_heads):
    check_mesh(dataclasses.replace(CASES_BY_NAME[name], head_dim=64, heads=8, kv_heads=kv_heads, ulysses=ulysses, batch=1), ring)


# head chunks: with KV heads of their own, sharing one (packed documents, sinks), repeated over the ranks, at 8 x 9
@pytest.mark.parametrize(("ulysses", "ring", "name", "heads", "kv_heads", "chunks"), [
    (2, 4, "causal_zigzag", 8, 4, 2), (2, 4, "sinks_balanced_window", 8, 2, 4), (4, 2, "balanced_causal", 8, 1, 2),
    (8, 9, "causal_zigzag", 32, 8, 4),
])
def test_fa4_ulysses_head_chunks(ulysses, ring, name, heads, kv_heads, chunks):
    case = dataclasses.replace(CASES_BY_NAME[name], head_dim=128, heads=heads, kv_heads=kv_heads, ulysses=ulysses, batch=1)
    check_mesh(case, ring, ulysses_chunks=chunks)


@pytest.mark.parametrize("chunks", [1, 4])
def test_fa4_ulysses_backward_reading_dout_where_it_lands(chunks):
    """A loss of out alone over packed documents: the backward's ring reads each chunk's dout in
    the receive region, which the exchange two chunks on lands in next (tests/test_mesh.py counts
    the copies on CPU)."""
    case = dataclasses.replace(CASES_BY_NAME["balanced_causal"], head_dim=128, heads=8, kv_heads=2, ulysses=2, batch=1)
    check_mesh(case, 4, with_dlse=False, ulysses_chunks=chunks)


@pytest.mark.parametrize("chunks", [1, 2])
def test_fa4_kept_documents_written_finished_where_ring_rows_do_not_divide_by_u(chunks):
    """182 rows per ring rank padded to 183 for u = 3: the kept documents' out is written finished
    into the buffer the exchange sends back (tests/test_mesh.py counts it on CPU)."""
    case = dataclasses.replace(CASES_BY_NAME["balanced_huge_gqa"], head_dim=128, heads=6, kv_heads=3, ulysses=3, batch=1)
    assert case.sharding(6).padded_ring_rows > case.sharding(6).ring_rows
    check_mesh(case, 2, ulysses_chunks=chunks)


@pytest.mark.parametrize("name", ["gemma3_packed_window_256", "mla_packed_balanced"])
def test_fa4_new_head_dims_on_a_2_by_4_mesh(name):
    check_mesh(dataclasses.replace(NEW_DIM_CASES[name], heads=8, kv_heads=2, ulysses=2, batch=1), 4)


@pytest.mark.parametrize(("ulysses", "ring"), [(8, 1), (8, 2), (4, 3)])
def test_fa4_ulysses_repeated_kv_head_gradients_within_1_2x_upstream(ulysses, ring):
    """One KV head repeated over u ulysses ranks: dk and dv, summed unrounded before one rounding,
    within 1.2x upstream FA4's error on one device (rounded per rank they reached 1.8-1.9x)."""
    case = dataclasses.replace(CASES_BY_NAME["causal_zigzag"], head_dim=128, heads=ulysses, kv_heads=1, ulysses=ulysses, batch=1)
    errors, baseline = check_mesh(case, ring)
    for tensor in ("dk", "dv"):
        assert errors[tensor] <= 1.2 * baseline[tensor], f"{tensor}: {errors[tensor]:.3e} vs upstream {baseline[tensor]:.3e}"
