"""The FA4 backend's host-side helpers, on CPU (flash-attn-4 imports without a GPU)."""

import dataclasses
import random

import pytest
import torch

pytest.importorskip("flash_attn.cute")
from fa4_cp.kernels import VarlenRows  # noqa: E402
from fa4_cp.kernels.fa4.varlen_dq import computed_row_map, varlen_row_map  # noqa: E402


def brute_force_row_map(cu: list[int], used: list[int], tile: int, total: int) -> torch.Tensor:
    """FA4's varlen dq accumulator starts sequence n at (cu[n] + n * tile) // tile * tile."""
    row_map = torch.full((total,), -1, dtype=torch.int32)
    for n, count in enumerate(used):
        start = (cu[n] + n * tile) // tile * tile
        for position in range(count):
            row_map[cu[n] + position] = start + position
    return row_map


@pytest.mark.parametrize("seed", range(4))
def test_varlen_row_map_matches_fa4s_layout(seed):
    """Empty sequences, sequences used in part, rows past the last sequence: the map made without a
    host sync (searchsorted) equals the one walked row by row, and a plan's block makes it once."""
    rng = random.Random(seed)
    for _ in range(50):
        lengths = [rng.choice([0, 0, 1, 5, 64, 128, 130, 300]) for _ in range(rng.randint(1, 12))]
        cu = [rng.choice([0, 0, 175])]  # a one-lane layout's first sequence starts past row 0
        for length in lengths:
            cu.append(cu[-1] + length)
        used, tile, total = [rng.randint(0, length) for length in lengths], rng.choice([64, 128]), cu[-1] + rng.choice([0, 7])
        cu_tensor, used_tensor = torch.tensor(cu, dtype=torch.int32), torch.tensor(used, dtype=torch.int32)
        assert torch.equal(computed_row_map(cu_tensor.long(), used_tensor.long(), tile, total), brute_force_row_map(cu, used, tile, total))
    block = VarlenRows(cu_tensor, cu_tensor, used_tensor, used_tensor)
    assert varlen_row_map(block, used_tensor, tile, total) is varlen_row_map(block, used_tensor, tile, total)


def preprocess_zeroed_tiles(cu: list[int], used: list[int], tile: int) -> set[int]:
    """The dq accumulator tiles FA4's backward preprocess zeroes: of each sequence, the tiles of its
    used rows, from its padded start (cu[n] + n * tile) // tile * tile."""
    return {(cu[n] + n * tile) // tile + block for n, count in enumerate(used) for block in range(-(-count // tile))}


@pytest.mark.parametrize("layout", ["balanced", "zigzag"])
def test_the_preprocess_zeroes_every_dq_tile_a_side_writes_or_reads(layout):
    """A varlen side's dq accumulator starts uninitialized and is zeroed by FA4's preprocess over
    the side's sequences (cu_seqlens_q, seqused_q_all): every block of the side writes within
    those tiles (its seqused_q within seqused_q_all), and the read-back's rows map into them."""
    from fa4_cp import Sharding
    from fa4_cp.kernels import BandMask
    from fa4_cp.plan.rows import rank_plan

    sharding, tile, checked = Sharding.documents([700, 3, 0, 1, 250, 64, 129, 2000, 17, 5000], 4, layout), 64, 0
    for rank in range(4):
        for block in (block for step in rank_plan(sharding, BandMask(hi=0), rank, torch.device("cpu")).steps for block in step.blocks):
            varlen = block.varlen
            cu, used = varlen.cu_seqlens_q.tolist(), varlen.seqused_q_all.tolist()
            assert all(mine <= every for mine, every in zip(varlen.seqused_q.tolist(), used, strict=True))
            zeroed = preprocess_zeroed_tiles(cu, used, tile)
            row_map = varlen_row_map(varlen, varlen.seqused_q_all, tile, sharding.local_len)
            assert set((row_map[row_map >= 0] // tile).tolist()) <= zeroed
            padded = (sharding.local_len + (len(used) + 1) * tile - 1) // tile * tile
            assert max(zeroed, default=-1) < padded // tile  # inside the accumulator
            checked += 1
    assert checked


def test_backward_takes_upstreams_causal_tiles_at_every_head_dim():
    """One tile configuration per head dim, upstream's causal one, swapped dK/dV operands at 192
    and 256 included (the epilogue adds them one float at a time)."""
    from flash_attn.cute.interface import _tile_size_bwd_sm90

    from fa4_cp.kernels.fa4.backward_sm90 import BackwardTiles

    for dims in ((64, 64), (128, 128), (192, 192), (192, 128), (256, 256)):
        assert BackwardTiles.for_head_dim(*dims).config == _tile_size_bwd_sm90(*dims, True, False)
    assert BackwardTiles.for_head_dim(256).config.dKV_swapAB


def test_a_launch_over_shared_kv_rows_covers_their_total_where_k_has_room_past_its_end():
    """Entries whose kv rows add up to more than k's: the launch's grid takes their total, and
    only where k's and v's storage holds the kernel's tile overhang past their last row (a tile
    reads that far once the grid is wider); fewer rows in total launch as before."""
    from fa4_cp.kernels.fa4.backward_pass_sm90 import _shared_kv_rows
    from fa4_cp.kernels.interface import KV_TILE_OVERHANG
    from oracle import PrefixEntries

    entries = PrefixEntries.make(100, ranks=2)
    varlen = entries.varlen("cpu")
    room = torch.zeros(100 + KV_TILE_OVERHANG, 2, 8)[:100]
    assert _shared_kv_rows(varlen, room, room) == sum(entries.seqused_k) > 100
    assert _shared_kv_rows(None, room, room) is None
    assert _shared_kv_rows(dataclasses.replace(varlen, shared_kv_rows=90), room, room) is None
    with pytest.raises(ValueError, match=f"v needs {KV_TILE_OVERHANG} rows of its storage past its last row"):
        _shared_kv_rows(varlen, room, torch.zeros(100, 2, 8))
