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
        sides = []
        for step, call in keys:
            sides.append(sharding.lane_rows(rank, call.q_lanes))
            sides.append(sharding.lane_rows(schedule.source_rank(rank, step), call.kv_lanes))
        docs = len(sharding.doc_lengths)
        table = torch.tensor([[*cu, *used] for cu, used in sides], dtype=torch.int32).to(device).view(len(keys), 2, 2 * docs + 1)
        everything = slice(None)
        for key, (q_side, kv_side) in zip(keys, table):
            self._rows[key] = BlockRows(
                everything,
                everything,
                VarlenRows(q_side[: docs + 1], kv_side[: docs + 1], q_side[docs + 1 :], kv_side[docs + 1 :]),
            )

    def __getitem__(self, key: tuple[int, BlockCall]) -> BlockRows:
        return self._rows[key]


@functools.lru_cache(maxsize=64)
def rank_rows(sharding: Sharding, schedule: RingSchedule, rank: int, device: torch.device) -> RankRows:
    return RankRows(sharding, schedule, rank, device)
