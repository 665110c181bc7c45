"""The ring loop, forward and backward: one loop for every layout, mask and transport.

Forward: KV travels; each step merges its blocks into fp32 (out, lse) accumulators. The next
hop is posted before the step's compute, into the other of two KV buffers.
Backward: KV travels ahead as in the forward; each step's dK/dV go into a zeroed fp32 buffer,
the partial sums arriving from the previous rank are added once that compute is done, and the
total moves on while the next step computes (three dKV buffers). After the last active step
each partial dK/dV jumps home to its owner in one hop.
The KV and dKV buffers belong to the transport and are reused by every step and call; on GPU,
hops run on the comm stream (see streams.py), so the loop never blocks the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.interface import LSE_ACCUMULATOR_DTYPE, AttentionBackend, accumulator_dtype
from .rows import rank_rows
from .schedule import RingSchedule
from .sharding import Sharding
from .streams import Arrival, post_hop
from .transport import Transport

KV_CHANNEL = 0
DKV_CHANNEL = 1


@dataclass(frozen=True)
class Ring:
    """Everything a ring call needs besides its tensors."""

    sharding: Sharding
    schedule: RingSchedule
    transport: Transport
    backend: AttentionBackend
    softmax_scale: float

    @property
    def rank(self) -> int:
        return self.transport.rank

    def home_offset(self, step: int) -> int:
        """The hop that brings the KV held at `step` back to its owner."""
        return -step % self.sharding.world_size

    def end_of_call(self) -> None:
        if self.transport.watchdog is not None:
            self.transport.watchdog.end_of_call()

    def describe_hop(self, what: str, step: int, offset: int) -> str:
        world_size = self.sharding.world_size
        return (
            f"the {what} hop from ring step {step} to {step + offset} (rank {(self.rank - offset) % world_size} "
            f"-> rank {self.rank} -> rank {(self.rank + offset) % world_size})"
        )


class _TravellingKV:
    """Local K and V packed into the first of two persistent buffers, then moved step to step."""

    def __init__(self, ring: Ring, k: torch.Tensor, v: torch.Tensor):
        self.ring = ring
        self.current = 0
        self.step = 0
        self.pending: Arrival | None = None
        if ring.sharding.world_size == 1:  # nothing travels: read the caller's K and V in place
            self.buffers = [(k, v)]
            return
        self.buffers = ring.transport.buffers(KV_CHANNEL, 2, (2, *k.shape), k.dtype, k.device)
        self.buffers[0][0].copy_(k)
        self.buffers[0][1].copy_(v)

    @property
    def held(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(K, V) held now, indexable as [0] and [1]."""
        return self.buffers[self.current]

    def post(self, offset: int) -> None:
        """Start moving the held KV `offset` ranks on; it is not read until `arrive`."""
        hop = self.ring.describe_hop("KV", self.step, offset)
        self.pending = post_hop(self.ring.transport, self.held, self.buffers[1 - self.current], offset, KV_CHANNEL, hop)
        self.step += offset

    def arrive(self) -> None:
        if self.pending is not None:
            self.pending.arrive()
            self.pending = None
            self.current = 1 - self.current

    def start_at(self, step: int) -> None:
        if step:
            self.post(step)
            self.arrive()


def _lse_shape(q: torch.Tensor) -> tuple[int, ...]:
    """(b, h, s) for dense q (b, s, h, d); (h, total) for varlen q (total, h, d)."""
    return (*q.shape[:-3], q.shape[-2], q.shape[-3])


def ring_forward(ring: Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local q against every rank's KV: (out, lse) in their accumulator dtypes."""
    schedule, rank = ring.schedule, ring.rank
    rows = rank_rows(ring.sharding, schedule, rank, q.device)
    out_acc = torch.empty(q.shape, dtype=accumulator_dtype(q.dtype), device=q.device)
    lse_acc = torch.empty(_lse_shape(q), dtype=LSE_ACCUMULATOR_DTYPE, device=q.device)
    # The first call may overwrite the accumulators if it covers every row (varlen: padding rows
    # are never covered); otherwise they start as "no key seen yet".
    first_calls = schedule.calls[rank][0] if schedule.steps else ()
    first_writes = not ring.sharding.varlen and bool(first_calls) and first_calls[0].q_lanes == range(ring.sharding.lanes)
    if not first_writes:
        out_acc.zero_()
        lse_acc.fill_(float("-inf"))

    kv = _TravellingKV(ring, k, v)
    if schedule.steps:
        kv.start_at(schedule.steps[0])
    for index, step in enumerate(schedule.steps):
        if index + 1 < len(schedule.steps):
            kv.post(schedule.steps[index + 1] - step)
        for number, call in enumerate(schedule.calls[rank][index]):
            block = rows[(step, call)]
            ring.backend.forward_step(
                q[..., block.q, :, :],
                kv.held[0][..., block.kv, :, :],
                kv.held[1][..., block.kv, :, :],
                out_acc[..., block.q, :, :],
                lse_acc[..., block.q],
                mask=call.mask,
                softmax_scale=ring.softmax_scale,
                accumulate=not (first_writes and index == 0 and number == 0),
                varlen=block.varlen,
            )
        kv.arrive()
    ring.end_of_call()
    return out_acc, lse_acc


def ring_backward(
    ring: Ring,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (accumulator dtype or q's), dk and dv (new tensors in k's dtype) of the local shard."""
    schedule, rank = ring.schedule, ring.rank
    rows = rank_rows(ring.sharding, schedule, rank, q.device)
    grads = ring.backend.backward(q, out, lse, dout, dlse, softmax_scale=ring.softmax_scale)
    if not schedule.steps:
        return grads.dq(), torch.zeros_like(k), torch.zeros_like(v)
    count = 1 if ring.sharding.world_size == 1 else 3
    free = ring.transport.buffers(DKV_CHANNEL, count, (2, *k.shape), accumulator_dtype(q.dtype), k.device)
    dkv = free.pop()
    in_flight: tuple[Arrival, torch.Tensor, torch.Tensor] | None = None

    kv = _TravellingKV(ring, k, v)
    kv.start_at(schedule.steps[0])
    for index, step in enumerate(schedule.steps):
        last = index + 1 == len(schedule.steps)
        if not last:
            kv.post(schedule.steps[index + 1] - step)
        dkv.zero_()
        for call in schedule.calls[rank][index]:
            block = rows[(step, call)]
            grads.step(
                kv.held[0][..., block.kv, :, :],
                kv.held[1][..., block.kv, :, :],
                dkv[0][..., block.kv, :, :],
                dkv[1][..., block.kv, :, :],
                q_rows=block.q,
                mask=call.mask,
                varlen=block.varlen,
            )
        if in_flight is not None:
            pending, sent, received = in_flight
            pending.arrive()
            dkv += received
            free += [sent, received]
        offset = ring.home_offset(step) if last else schedule.steps[index + 1] - step
        if offset == 0:
            ring.end_of_call()
            return grads.dq(), dkv[0].to(k.dtype, copy=True), dkv[1].to(v.dtype, copy=True)
        target = free.pop()
        hop = ring.describe_hop("dKV", step, offset)
        in_flight = (post_hop(ring.transport, dkv, target, offset, DKV_CHANNEL, hop), dkv, target)
        dkv = free.pop()
        kv.arrive()
    pending, _, received = in_flight
    pending.arrive()
    ring.end_of_call()
    return grads.dq(), received[0].to(k.dtype, copy=True), received[1].to(v.dtype, copy=True)
