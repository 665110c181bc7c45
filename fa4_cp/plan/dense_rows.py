"""One rank's plan for a dense sequence: the ring schedule's calls, each a row slice of the
rank's lanes (a q side, a kv side), with the schedule's first write."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.interface import BandMask
from .rows import PlannedBlock, PlannedStep, RankPlan, ring_stream
from .schedule import build_schedule

if TYPE_CHECKING:
    from .chunked_sharding import ChunkedSharding


def dense_plan(sharding: ChunkedSharding, mask: BandMask, rank: int, device: torch.device) -> RankPlan:
    """Dense sides are row slices of the rank's lanes; no tensor is built (`device` unused)."""
    schedule = build_schedule(sharding, mask)
    q_sides: dict[range, int] = {}
    kv_sides: dict[range, int] = {}
    planned = []
    first = True
    for step, calls in zip(schedule.steps, schedule.calls[rank]):
        blocks = []
        for call in calls:
            blocks.append(
                PlannedBlock(
                    q_side=q_sides.setdefault(call.q_lanes, len(q_sides)),
                    kv_side=kv_sides.setdefault(call.kv_lanes, len(kv_sides)),
                    mask=call.mask,
                    accumulate=not (first and schedule.writes_first[rank]),
                    varlen=None,
                )
            )
            first = False
        planned.append(PlannedStep(step, tuple(blocks)))
    return RankPlan(
        sharding.world_size,
        rank,
        tuple(_dense_rows(sharding, lanes) for lanes in q_sides),
        tuple(_dense_rows(sharding, lanes) for lanes in kv_sides),
        tuple(planned),
        schedule.writes_first[rank],
        ring_stream(schedule.steps),
    )


def _dense_rows(sharding: ChunkedSharding, lanes: range) -> slice | None:
    """The rows of a run of lanes; None for every row."""
    if lanes == range(sharding.lanes):
        return None
    return sharding.lane_slice(lanes)
