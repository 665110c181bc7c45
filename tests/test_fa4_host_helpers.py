"""The FA4 backend's host-side helpers, on CPU (flash-attn-4 imports without a GPU)."""

import random

import pytest
import torch

pytest.importorskip("flash_attn.cute")
from fa4_cp.kernels import VarlenRows  # noqa: E402
from fa4_cp.kernels.fa4.backward_pass_sm90 import _computed_row_map, _row_map  # noqa: E402


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
        cu = [0]
        for length in lengths:
            cu.append(cu[-1] + length)
        used, tile, total = [rng.randint(0, length) for length in lengths], rng.choice([64, 128]), cu[-1] + rng.choice([0, 7])
        cu_tensor, used_tensor = torch.tensor(cu, dtype=torch.int32), torch.tensor(used, dtype=torch.int32)
        assert torch.equal(_computed_row_map(cu_tensor.long(), used_tensor.long(), tile, total), brute_force_row_map(cu, used, tile, total))
    block = VarlenRows(cu_tensor, cu_tensor, used_tensor, used_tensor)
    assert _row_map(block, used_tensor, tile, total) is _row_map(block, used_tensor, tile, total)
