"""The ring loop, forward and backward: one loop for every layout, mask and transport.

Forward: KV travels; each step merges its blocks into fp32 (out, lse) accumulators. The next
hop is posted before the step's compute, into the other of two KV buffers.
Backward: KV travels ahead as in the forward; each step's dK/dV go into a zeroed fp32 buffer,
the partial sums arriving from the previous rank are added once that compute is done, and the
total moves on while the next step computes (three dKV buffers). After the last active step
each partial dK/dV jumps home to its owner in one hop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.interface import LSE_ACCUMULATOR_DTYPE, AttentionBackend, accumulator_dtype
from .rows import rank_rows
from .schedule import RingSchedule
from .sharding import Sharding
from .transport import PendingShift, Transport

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


class _TravellingKV:
    """Local K and V packed into one buffer, then moved step to step through two buffers."""

    def __init__(self, ring: Ring, k: torch.Tensor, v: torch.Tensor):
        self.ring = ring
        self.buffers = [torch.stack((k, v)), torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)]
        self.current = 0
        self.pending: PendingShift | None = None

    @property
    def held(self) -> torch.Tensor:
        return self.buffers[self.current]

    def post(self, offset: int) -> None:
        """Start moving the held KV `offset` ranks on; it is not read until `arrive`."""
        self.pending = self.ring.transport.shift(self.held, self.buffers[1 - self.current], offset, KV_CHANNEL)

    def arrive(self) -> None:
        if self.pending is not None:
            self.pending.wait()
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
    """dq, dk, dv of the local shard, in the accumulator dtype, from the final (out, lse)."""
    schedule, rank = ring.schedule, ring.rank
    rows = rank_rows(ring.sharding, schedule, rank, q.device)
    grads = ring.backend.backward(q, out, lse, dout, dlse, softmax_scale=ring.softmax_scale)
    dtype = accumulator_dtype(q.dtype)
    free = [torch.empty((2, *k.shape), dtype=dtype, device=k.device) for _ in range(3)]
    dkv = free.pop()
    if not schedule.steps:
        return grads.dq(), *dkv.zero_()
    in_flight: tuple[PendingShift, torch.Tensor, torch.Tensor] | None = None

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
            pending.wait()
            dkv += received
            free += [sent, received]
        offset = ring.home_offset(step) if last else schedule.steps[index + 1] - step
        if offset == 0:
            return grads.dq(), dkv[0], dkv[1]
        target = free.pop()
        in_flight = (ring.transport.shift(dkv, target, offset, DKV_CHANNEL), dkv, target)
        dkv = free.pop()
        kv.arrive()
    pending, _, received = in_flight
    pending.wait()
    return grads.dq(), received[0], received[1]
