"""Kernel arguments of a rank's block calls: dense row slices, or varlen cu_seqlens/seqused.

Everything one rank needs for a whole ring is built once and copied to the device in one go,
so the ring loop itself makes no host-to-device copies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels.interface import VarlenRows
from .schedule import BlockCall, RingSchedule
from .sharding import Sharding


@dataclass(frozen=True)
class BlockRows:
    q: slice
    kv: slice
    varlen: VarlenRows | None


class RankRows:
    """BlockRows of every call `rank` makes in `schedule`."""

    def __init__(self, sharding: Sharding, schedule: RingSchedule, rank: int, device: torch.device):
        self._rows: dict[tuple[int, BlockCall], BlockRows] = {}
        keys = [
            (step, call) for step, calls in zip(schedule.steps, schedule.calls[rank]) for call in calls
        ]
        if not sharding.varlen:
            for key in keys:
                call = key[1]
                self._rows[key] = BlockRows(sharding.lane_slice(call.q_lanes), sharding.lane_slice(call.kv_lanes), None)
            return
        # One tensor per distinct side, so calls over the same q lanes share their VarlenRows
        # tensors: a backend may key per-call-state (e.g. a dq accumulator) on them.
        side_keys: dict[tuple, int] = {}
        sides = []
        for step, call in keys:
            for side in (("q", rank, call.q_lanes), ("kv", schedule.source_rank(rank, step), call.kv_lanes)):
                if side not in side_keys:
                    side_keys[side] = len(sides)
                    sides.append(sharding.lane_rows(side[1], side[2]))
        docs = len(sharding.doc_lengths)
        table = torch.tensor([[*cu, *used] for cu, used in sides], dtype=torch.int32).to(device)
        everything = slice(None)
        for step, call in keys:
            q_side = table[side_keys[("q", rank, call.q_lanes)]]
            kv_side = table[side_keys[("kv", schedule.source_rank(rank, step), call.kv_lanes)]]
            self._rows[(step, call)] = BlockRows(
                everything,
                everything,
                VarlenRows(q_side[: docs + 1], kv_side[: docs + 1], q_side[docs + 1 :], kv_side[docs + 1 :]),
            )

    def __getitem__(self, key: tuple[int, BlockCall]) -> BlockRows:
        return self._rows[key]


@functools.lru_cache(maxsize=64)
def rank_rows(sharding: Sharding, schedule: RingSchedule, rank: int, device: torch.device) -> RankRows:
    return RankRows(sharding, schedule, rank, device)
