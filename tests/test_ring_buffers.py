"""Ring buffers are persistent: the same memory serves every step and every call."""

import torch

from fa4_cp import SimulatedRing, ring_attention
from fa4_cp.comm.buffers import BufferPool
from fa4_cp.comm.group import LocalGroup, resolve_group
from fa4_cp.comm.transport import LocalTransport


def test_pool_reuses_and_grows():
    pool = BufferPool()
    first = pool.slots(0, 2, (3, 5), torch.float32, torch.device("cpu"))
    again = pool.slots(0, 2, (3, 5), torch.float32, torch.device("cpu"))
    assert [t.data_ptr() for t in first] == [t.data_ptr() for t in again]
    assert first[1].data_ptr() - first[0].data_ptr() >= 3 * 5 * 4
    smaller = pool.slots(0, 2, (2, 5), torch.bfloat16, torch.device("cpu"))
    assert smaller[0].data_ptr() == first[0].data_ptr()
    bigger = pool.slots(0, 3, (30, 5), torch.float32, torch.device("cpu"))
    assert all(t.shape == (30, 5) for t in bigger)
    other_channel = pool.slots(1, 1, (3, 5), torch.float32, torch.device("cpu"))
    assert other_channel[0].data_ptr() not in {t.data_ptr() for t in bigger}


def test_pool_carves_a_request_once_per_arena_and_keeps_few():
    """A repeated request gets the same views (no carving at every call); views of a grown arena
    are carved afresh; the pool keeps the views of its last CARVED_KEPT requests only."""
    from fa4_cp.comm.buffers import CARVED_KEPT

    cpu, pool = torch.device("cpu"), BufferPool()
    first = pool.slots(0, 2, (3, 5), torch.float32, cpu)
    again = pool.slots(0, 2, (3, 5), torch.float32, cpu)
    assert all(a is b for a, b in zip(first, again)) and first is not again  # a list of its own each
    pool.slots(0, 3, (30, 5), torch.float32, cpu)  # the arena grows
    regrown = pool.slots(0, 2, (3, 5), torch.float32, cpu)
    assert regrown[0] is not first[0] and regrown[0].data_ptr() == pool.arena(0).data_ptr()
    pool.slots(1, 1, (3 * CARVED_KEPT, 5), torch.float32, cpu)  # channel 1's arena at its largest: no growth below
    for rows in range(1, 3 * CARVED_KEPT):
        pool.slots(1, 1, (rows, 5), torch.float32, cpu)
        kept = pool.slots(0, 2, (3, 5), torch.float32, cpu)  # asked for at every step: never the one dropped
        assert kept[0] is regrown[0]
    assert len(pool._carved) <= CARVED_KEPT


def test_pool_slots_hold_finite_values_of_their_dtype():
    """Fresh arenas are zeroed, and again when carved into another dtype: bytes written as one
    dtype's finite values may read as another's NaN. Within one dtype a call's values stay."""
    cpu = torch.device("cpu")
    pool = BufferPool(lambda nbytes, device: torch.full((nbytes,), 255, dtype=torch.uint8, device=device))  # NaN as any float
    (slot,) = pool.slots(0, 1, (4, 8), torch.bfloat16, cpu)
    assert torch.isfinite(slot).all()
    slot.fill_(1.5)
    (shorter,) = pool.slots(0, 1, (2, 8), torch.bfloat16, cpu)
    assert torch.equal(shorter, torch.full((2, 8), 1.5, dtype=torch.bfloat16))
    (wide,) = pool.slots(0, 1, (4, 4), torch.float32, cpu)
    wide.view(torch.int32).fill_(0x3F80FFFF)  # a finite float32 whose low half is a bfloat16 NaN
    assert torch.isfinite(wide).all()
    (narrow,) = pool.slots(0, 1, (4, 8), torch.bfloat16, cpu)
    assert torch.isfinite(narrow).all()


def test_one_transport_per_group_keeps_its_buffers_across_calls():
    group = resolve_group(None)
    assert isinstance(group, LocalGroup) and group is resolve_group(None)
    cpu = torch.device("cpu")
    assert isinstance(group.transport("auto", cpu), LocalTransport) and group.transport("auto", cpu) is group.transport("nccl", cpu)


def test_ring_calls_reuse_the_transports_buffers():
    """Two calls on one simulated rank use the same KV and dKV buffers and give the same grads, in
    one run of the ring and in the next."""

    def body(group):
        q = torch.randn(1, 16, 2, 8, requires_grad=True)
        pointers, grads = [], []
        for _ in range(2):
            ring_attention(q, q, q, group=group, causal=True).sum().backward()
            grads.append(q.grad.clone())
            q.grad = None
            pool = group.transport("auto", q.device)._pool
            pointers.append([pool.arena(channel).data_ptr() for channel in (0, 1)])
        return pointers, grads

    ring = SimulatedRing(2)
    first_run, second_run = ring.run(body), ring.run(body)
    for pointers, grads in first_run:
        assert pointers[0] == pointers[1]
        torch.testing.assert_close(grads[0], grads[1])
    # a simulated rank keeps its group, and so its buffers, from one run to the next, as a process group does
    assert [pointers for pointers, _ in first_run] == [pointers for pointers, _ in second_run]


def test_returned_gradients_do_not_alias_the_reused_buffers():
    """fp64 inputs: dk has the accumulator's dtype, so only an explicit copy keeps it out of the pool."""
    q = torch.randn(1, 16, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    (first,) = torch.autograd.grad(ring_attention(q, k, v, causal=True).sum(), k)
    first_values = first.clone()
    (second,) = torch.autograd.grad(ring_attention(q * 2, k, v, causal=True).sum(), k)
    assert not torch.equal(second, first_values)
    assert torch.equal(first, first_values)


class _RecordingTransport:
    """One rank's transport that moves nothing and records each hop it is asked for."""

    stream_ordered = False
    watchdog = None

    def __init__(self):
        self.pool, self.hops = BufferPool(), []

    def buffers(self, channel, count, shape, dtype, device):
        return self.pool.slots(channel, count, shape, dtype, device)

    def shift(self, sends, recvs, offset, channel=0, lands_at=None):
        self.hops.append((channel, offset, len(sends)))
        return _Landed()


class _Landed:
    def wait(self) -> None:
        pass


def test_kv_hops_run_ahead_of_the_compute_on_a_stream_of_some_rows():
    """A balanced layout's stream takes a buffer for each hop it runs ahead of the compute, up to
    KV_HOPS_AHEAD, and posts a hop into every free buffer at the first step (where no step reads
    the own KV, its buffer too, once the first hop has sent it); the dense ring's whole K and V
    keep two buffers, one hop ahead."""
    from fa4_cp import Sharding
    from fa4_cp.kernels import BandMask
    from fa4_cp.plan.rows import rank_plan
    from fa4_cp.runtime.travelling import KV_AHEAD_BYTES, KV_HOPS_AHEAD, TravellingKV, _kv_buffers

    cpu = torch.device("cpu")
    sharding = Sharding.documents([4096, 64, 64, 64], 8, "balanced")  # the long document over all 8 ranks
    assert max(ranks for _, ranks in sharding.spans) == 8
    plan = rank_plan(sharding, BandMask(hi=0), 3, cpu)
    spread = [stream for stream in plan.streams if len(stream.steps) > 2]
    assert spread and all(stream.held_rows is not None for stream in plan.streams)
    for stream in spread:
        hops = len(stream.steps) - (1 if stream.steps[0] == 0 else 0)
        assert _kv_buffers(plan, stream, 2**20) == 1 + min(KV_HOPS_AHEAD, hops)
        assert _kv_buffers(plan, stream, KV_AHEAD_BYTES // 2) == 4  # only two past the first two fit
        assert _kv_buffers(plan, stream, KV_AHEAD_BYTES + 1) == 2
    k = torch.randn(sharding.local_len, 2, 8)
    transport = _RecordingTransport()
    kv = TravellingKV(plan, transport, k, k)
    hops = [len(stream.steps) - (1 if stream.steps[0] == 0 else 0) for stream in plan.streams]
    free = [_kv_buffers(plan, stream, 2**20) - (1 if stream.steps[0] == 0 else 0) for stream in plan.streams]
    kv.before_step(plan.steps[0].step)
    assert len(transport.hops) == sum(map(min, hops, free))
    for step in plan.steps[1:]:
        kv.before_step(step.step)
    assert len(transport.hops) == sum(hops) and all(pieces == 2 for *_, pieces in transport.hops)  # K's rows and V's, one transfer

    dense = rank_plan(Sharding.dense(8 * 64, 8, "zigzag"), BandMask(hi=0), 3, cpu)
    assert [_kv_buffers(dense, stream, 2**20) for stream in dense.streams] == [2]
