"""Pitched pieces on one GPU: the driver's 2-D copy on a copy engine (comm/stream_memops.copy_2d),
the piece copies of the transports (comm/pitched.copy_piece), and a simulated 2-D mesh whose
exchanges send head groups from where they lie, against fp64."""

import dataclasses

import pytest
import torch

from fa4_cp.comm import pitched, stream_memops
from fa4_cp.comm.simulated import SimulatedMesh
from oracle import CASES_BY_NAME, DTYPES, assert_ring_matches, make_inputs, on_cuda, ring_results_for_rank

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and stream_memops.available()), reason="needs CUDA and its driver's memory operations")


@pytest.mark.parametrize(("batch", "rows", "heads", "group", "head_dim"), [(1, 1000, 64, 8, 128), (2, 333, 16, 1, 128), (1, 4096, 8, 4, 64)])
def test_a_head_group_lands_as_its_bytes_by_one_2d_copy(batch, rows, heads, group, head_dim):
    q = torch.randn(batch, rows, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    piece = q[..., heads - group :, :]
    landed = torch.full((piece.numel() * 2,), 0xFF, dtype=torch.uint8, device="cuda")  # NaN if not written
    described = pitched.pitched_rows(piece)
    stream = torch.cuda.current_stream()
    stream_memops.copy_2d(stream, landed.data_ptr(), described.width, piece.data_ptr(), described.pitch, described.width, described.height)
    torch.cuda.synchronize()
    assert torch.equal(landed.view(torch.bfloat16).view(piece.shape), piece)


def test_copy_piece_takes_the_copy_engine_on_a_gpu():
    q = torch.randn(1, 2048, 32, 128, device="cuda", dtype=torch.bfloat16)
    piece = q[..., 8:12, :]
    landed = torch.full((piece.numel() * 2,), 0xFF, dtype=torch.uint8, device="cuda")
    pitched.copy_piece(landed, piece)
    torch.cuda.synchronize()
    assert pitched._LOCAL_COPIES.by_copy_engine(), "the driver refused the local 2-D copy: pieces fall back to SM copies"
    assert torch.equal(landed.view(torch.bfloat16).view(piece.shape), piece)


def test_a_head_group_goes_into_another_head_group_by_one_2d_copy():
    source = torch.randn(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16)
    into = torch.full((1, 1024, 32, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    pitched.copy_piece(into[..., 8:12, :], source[..., 4:8, :])
    torch.cuda.synchronize()
    assert pitched._LOCAL_COPIES.by_copy_engine()
    assert torch.equal(into[..., 8:12, :], source[..., 4:8, :]) and into[..., :8, :].isnan().all() and into[..., 12:, :].isnan().all()


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize(("ulysses", "ring", "name", "heads", "kv_heads"), [(2, 2, "balanced_causal", 4, 2), (4, 2, "causal_zigzag", 8, 2)])
def test_a_mesh_sending_head_groups_where_they_lie_matches_fp64(ulysses, ring, name, heads, kv_heads):
    case = dataclasses.replace(CASES_BY_NAME[name], ulysses=ulysses, heads=heads, kv_heads=kv_heads, name=f"{name}_u{ulysses}")
    world, dtype = ulysses * ring, DTYPES["bf16"]
    inputs = make_inputs(case, world, dtype, seed=world + heads)
    gpu_inputs = on_cuda(inputs)
    per_rank = SimulatedMesh(ulysses, ring).run(
        lambda group: ring_results_for_rank(case, world, gpu_inputs, group, group.rank, backend="reference", ulysses_chunks=2)
    )
    assert all(t.is_cuda for result in per_rank for t in result.values())
    assert_ring_matches(case, world, inputs, dtype, per_rank)
