"""Transports move buffers the right number of ranks, for odd and even W, on every channel at once."""

import pytest
import torch

from fa4_cp import SimulatedRing
from fa4_cp.comm.group import resolve_group
from ranks import run_ranks, values


def shift_everywhere(rank: int, world_size: int, group=None) -> list[tuple[int, int, int]]:
    """(offset, received from, channel) for every offset, with two channels in flight together."""
    ring = resolve_group(group)
    transport = ring.transport("auto", torch.device("cpu"))
    seen = []
    for offset in range(1, 2 * world_size + 1):
        sends = [torch.full((3, 5), float(100 * channel + rank)) for channel in (0, 1)]
        recvs = [torch.full((3, 5), float("nan")) for _ in (0, 1)]
        pending = [transport.shift([sends[c]], [recvs[c]], offset, channel=c) for c in (0, 1)]
        for c in (1, 0):
            pending[c].wait()
        for c in (0, 1):
            assert (recvs[c] == recvs[c][0, 0]).all()
            seen.append((offset, int(recvs[c][0, 0].item()) - 100 * c, c))
    gathered = ring.all_gather(torch.tensor([rank * 7]))
    assert [int(t) for t in gathered] == [7 * r for r in range(world_size)]
    return seen


def expected(rank: int, world_size: int) -> list[tuple[int, int, int]]:
    return [(offset, (rank - offset) % world_size, c) for offset in range(1, 2 * world_size + 1) for c in (0, 1)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_simulated_shift(world_size):
    results = SimulatedRing(world_size).run(lambda group: shift_everywhere(group.rank, world_size, group))
    assert results == [expected(rank, world_size) for rank in range(world_size)]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_shift_is_deadlock_free(world_size, tmp_path):
    assert values(run_ranks(shift_everywhere, world_size, tmp_path, timeout=120)) == [expected(rank, world_size) for rank in range(world_size)]


def test_simulated_ring_reports_a_failing_rank_instead_of_hanging():
    def body(group):
        if group.rank == 2:
            raise RuntimeError("rank 2 fails on purpose")
        transport = group.transport("auto", torch.device("cpu"))
        transport.shift([torch.zeros(2)], [torch.zeros(2)], 1).wait()

    with pytest.raises(RuntimeError, match="rank 2 fails on purpose"):
        SimulatedRing(4, timeout=30).run(body)


def test_simulated_ring_times_out_a_missing_peer():
    def body(group):
        if group.rank == 0:
            group.transport("auto", torch.device("cpu"))  # collective: the peer never joins

    with pytest.raises(RuntimeError, match="no peer answered"):
        SimulatedRing(2, timeout=1).run(body)


def shift_pieces(rank: int, world_size: int, group=None) -> list[int]:
    """A shift of a hop's pieces (sizes and dtypes of their own, one of them empty) moves them as
    one transfer, each landing in its own recv, for every offset."""
    transport = resolve_group(group).transport("auto", torch.device("cpu"))
    sources = []
    for offset in range(1, world_size + 2):
        sends = [torch.full((4,), float(rank)), torch.empty(0), torch.full((2, 3), rank, dtype=torch.int64)]
        recvs = [torch.full((4,), float("nan")), torch.empty(0), torch.full((2, 3), -1, dtype=torch.int64)]
        transport.shift(sends, recvs, offset, channel=1).wait()
        source = (rank - offset) % world_size
        assert (recvs[0] == source).all() and (recvs[2] == source).all(), (offset, recvs)
        sources.append(source)
    return sources


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_simulated_shift_of_several_pieces(world_size):
    results = SimulatedRing(world_size).run(lambda group: shift_pieces(group.rank, world_size, group))
    assert results == [[(rank - offset) % world_size for offset in range(1, world_size + 2)] for rank in range(world_size)]


@pytest.mark.slow
def test_gloo_shift_of_several_pieces(tmp_path):
    assert values(run_ranks(shift_pieces, 2, tmp_path, timeout=120)) == [[1, 0, 1], [0, 1, 0]]
