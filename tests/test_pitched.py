"""Pitched rows (comm/pitched.py): the description a copy engine's 2-D copy takes, checked against
the bytes of the tensor it describes, and the piece copies the transports make of them."""

import itertools

import pytest
import torch

from fa4_cp.comm.pitched import PitchedRows, copy_piece, pitched_rows


def bytes_in_order(x: torch.Tensor) -> bytes:
    return x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def bytes_by_rows(x: torch.Tensor, rows: PitchedRows) -> bytes:
    storage = bytes(x.untyped_storage())
    start = x.storage_offset() * x.element_size()
    return b"".join(storage[start + k * rows.pitch : start + k * rows.pitch + rows.width] for k in range(rows.height))


def views_of(base: torch.Tensor):
    """Head groups, row ranges, batch slices, permutations and expansions of a (2, 12, 8, 4) tensor."""
    yield base
    for first, size in ((0, 2), (2, 4), (6, 2), (0, 8)):
        group = base.narrow(-2, first, size)
        yield group
        yield group[1]
        yield group[:, 3:9]
        yield group[:, 5:6]
        yield group.unflatten(-2, (size // 2, 2))
    yield base.unflatten(-2, (2, 2, 2)).movedim(-4, 0)[1]  # a rank's heads of every chunk
    yield base.transpose(1, 2)
    yield base[..., ::2]
    yield base[:, ::2]
    yield base[:, :1].expand(2, 12, 8, 4)
    yield base.narrow(-1, 0, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pitched_rows_describe_the_bytes_of_the_tensor_in_order(dtype):
    base = torch.randn(2, 12, 8, 4).to(dtype)
    described = 0
    for view in views_of(base):
        rows = pitched_rows(view)
        if rows is None:
            continue
        described += 1
        assert rows.width * rows.height == view.numel() * view.element_size()
        assert rows.pitch >= rows.width
        assert bytes_by_rows(view, rows) == bytes_in_order(view), (tuple(view.shape), view.stride(), rows)
    assert described >= 20


def test_pitched_rows_of_a_head_group_and_what_has_none():
    q = torch.empty(1, 300, 16, 128, dtype=torch.bfloat16)
    assert pitched_rows(q) == PitchedRows(width=300 * 16 * 128 * 2, pitch=300 * 16 * 128 * 2, height=1)
    assert pitched_rows(q[..., 4:8, :]) == PitchedRows(width=4 * 128 * 2, pitch=16 * 128 * 2, height=300)
    assert pitched_rows(torch.empty(3, 300, 16, 128)[..., 4:8, :]) == PitchedRows(width=4 * 128 * 4, pitch=16 * 128 * 4, height=900)
    assert pitched_rows(q.transpose(1, 2)) is None  # rows of one element a row apart: not one pitch
    assert pitched_rows(q[..., ::2]) is None  # the last dim strided
    assert pitched_rows(q[:, :0]) is None  # empty
    assert pitched_rows(torch.empty(5, 1, 4)[:, :, :2].expand(5, 3, 2)) is None  # rows repeated
    from fa4_cp.comm.pitched import _pitched

    assert _pitched((2, 64), (2**30 - 1, 1), 2) == PitchedRows(width=128, pitch=2**31 - 2, height=2)
    assert _pitched((2, 64), (2**30, 1), 2) is None  # a pitch of 2 GiB: past what the driver's 2-D copy takes


def test_copy_piece_lands_a_pitched_piece_as_its_bytes_places_it_back_and_refuses_a_misfit():
    q = torch.randn(1, 30, 8, 16, dtype=torch.bfloat16)
    group = q[..., 2:4, :]
    landed = torch.full((group.numel() * 2,), 255, dtype=torch.uint8)
    copy_piece(landed, group)
    assert torch.equal(landed.view(torch.bfloat16).view(group.shape), group)
    same = torch.empty_like(group)
    copy_piece(same, group)
    assert torch.equal(same, group)
    placed = torch.full_like(q, float("nan"))  # and back from the bytes into a head group
    copy_piece(placed[..., 5:7, :], landed)
    assert torch.equal(placed[..., 5:7, :], group) and placed[..., :5, :].isnan().all() and placed[..., 7:, :].isnan().all()
    with pytest.raises(ValueError, match=r"does not fit"):
        copy_piece(torch.empty(group.numel() * 2 - 2, dtype=torch.uint8), group)
    copy_piece(placed[..., 0:2, :], group)  # both strided, of one shape and dtype
    assert torch.equal(placed[..., 0:2, :], group)
    with pytest.raises(ValueError, match=r"neither is its bytes in order"):
        copy_piece(torch.zeros(1, 30, 16, 8)[..., 0:2, :], group)  # as many bytes, strided, another dtype


def test_the_simulated_transport_takes_pitched_sends_as_the_copy_engine_does():
    """Each rank sends the head group of its peer (offset 0 included, copied to itself) into a
    receive buffer of bytes; what lands is the group's bytes in order."""
    from fa4_cp import SimulatedRing

    world = 3
    q = [torch.randn(1, 10, 2 * world, 8) for _ in range(world)]

    def rank(group):
        transport = group.transport("auto", torch.device("cpu"))
        nbytes = 10 * 2 * 8 * 4
        landed = []
        for offset in range(world):
            recv = transport.buffers(2, 1, (nbytes,), torch.uint8, torch.device("cpu"))[0]
            peer = (group.rank + offset) % world
            transport.shift([q[group.rank][..., 2 * peer : 2 * peer + 2, :]], [recv], offset, 2).wait()
            landed.append(recv.view(torch.float32).view(1, 10, 2, 8).clone())
        return landed

    for me, landed in enumerate(SimulatedRing(world).run(rank)):
        for offset, piece in zip(itertools.count(), landed):
            sender = (me - offset) % world
            assert torch.equal(piece, q[sender][..., 2 * me : 2 * me + 2, :])


def test_the_copy_engine_sends_a_pitched_piece_by_one_2d_copy_into_its_peer(monkeypatch):
    """CopyEngineTransport.shift on this CPU, the driver calls recorded: a head group goes by one
    2-D copy landing contiguous at its place in the peer's arena, a contiguous piece by one plain
    copy, and a piece no pitch describes is refused."""
    import collections
    import types

    from fa4_cp.comm import copy_engine, stream_memops

    calls = []
    monkeypatch.setattr(stream_memops, "copy", lambda stream, dst, src, nbytes: calls.append(("copy", dst, src, nbytes)))
    monkeypatch.setattr(stream_memops, "copy_2d", lambda stream, *args: calls.append(("copy_2d", *args)))
    monkeypatch.setattr(stream_memops, "write_value", lambda *args: None)
    monkeypatch.setattr(stream_memops, "wait_value", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    transport = object.__new__(copy_engine.CopyEngineTransport)
    transport.rank, transport.world_size, transport.device = 0, 2, torch.device("cpu")
    arena = torch.zeros(4096, dtype=torch.uint8)
    peer_arena = 1 << 40
    transport._pool = types.SimpleNamespace(arena=lambda channel: arena)
    transport._arenas = {arena.data_ptr(): (None, [arena.data_ptr(), peer_arena])}
    transport._stored, transport._awaited, transport._flag_ptrs = collections.Counter(), collections.Counter(), [0, 0]
    q = torch.randn(1, 10, 4, 8, dtype=torch.bfloat16)
    group, contiguous = q[..., 2:4, :], torch.randn(16)
    transport.shift([group, contiguous], [arena[256 : 256 + 320], arena[1024 : 1024 + 64]], 1, 2)
    row, pitch = 2 * 8 * 2, 4 * 8 * 2
    assert calls == [("copy_2d", peer_arena + 256, row, group.data_ptr(), pitch, row, 10), ("copy", peer_arena + 1024, contiguous.data_ptr(), 64)]
    with pytest.raises(ValueError, match=r"sends contiguous or pitched rows"):
        transport.shift([q.transpose(1, 2)], [arena[:640]], 1, 2)


def test_one_2d_copy_where_both_sides_are_rows_of_one_width_and_height():
    """The copy a GPU makes of a piece into its place: the strided side's rows (the other side
    contiguous), or, both strided, rows of one width and height on both; else none (an SM copy)."""
    from fa4_cp.comm.pitched import _matching_rows

    into, out_of = torch.empty(1, 30, 8, 16, dtype=torch.bfloat16), torch.empty(1, 30, 4, 16, dtype=torch.bfloat16)
    assert _matching_rows(into[..., 2:4, :], out_of[..., 0:2, :]) == (8 * 16 * 2, 4 * 16 * 2, 2 * 16 * 2, 30)
    assert _matching_rows(torch.empty(30 * 2 * 16 * 2, dtype=torch.uint8), out_of[..., 0:2, :]) == (64, 128, 64, 30)
    assert _matching_rows(into[..., 2:4, :], torch.empty(30 * 2 * 16 * 2, dtype=torch.uint8)) == (256, 64, 64, 30)
    batch_rows = torch.empty(2, 60, 2, 16)[:, :30]  # a batch of rows: one row a batch, 30 x 2 x 16 wide
    assert _matching_rows(batch_rows, torch.empty(2, 30, 8, 16)[..., 2:4, :]) is None
