"""A placement with its kept documents traded off the most loaded rank: a variant for replays to
measure beside the layout's choice, not part of the layout.

Session 16 traded kept documents inside the layout (6d1e091) and took the trades out again
(06e7356): replayed, the slowest fine-tuning-like rank was 1.5% / 1.7% lighter at W = 16 / 32 and
3.4% heavier at W = 64, its remote steps slower as the trades added kept documents to it, which
every remote launch then listed. Since session 19 a remote launch lists and covers only the
sequences it computes (VarlenRows.computed_sequences), so bench/placement_replay.py replays this
variant again, on the same machine as the layout's choice.

A trade hands a kept document of the most loaded rank to another rank, for nothing, one of its
kept documents or two, while it lowers the larger load of the two ranks (placement.rank_costs_ms,
at the ring rank's heads) and both stay within the greedy's row limit.
"""

from __future__ import annotations

import math

import numpy as np

from fa4_cp.plan.placement import BalancedSharding, _members, rank_costs_ms, span_rows
from fa4_cp.tuning.kernel_cost import CALIBRATED_HEAD_DIM, TILE, span_us


def kept_documents_traded(sharding: BalancedSharding, heads: int, head_dim: int = CALIBRATED_HEAD_DIM) -> BalancedSharding:
    world, lengths, spans = sharding.world_size, sharding.doc_lengths, list(sharding.spans)
    kept = np.array([doc for doc, (_, ranks) in enumerate(spans) if ranks == 1], dtype=np.int64)
    if not kept.size:
        return sharding
    capacity = math.ceil(sum(lengths) / world) + TILE
    loads, rows = np.array([sum(cost) for cost in rank_costs_ms(sharding, heads, head_dim)]), np.zeros(world, dtype=np.int64)
    for length, (first, ranks) in zip(lengths, spans):
        if ranks:
            rows[_members(world, first, ranks)] += span_rows(length, ranks)
    home = np.array([spans[doc][0] for doc in kept])
    # every trade as (given, taken): a move takes nothing, a swap one document, two for one a pair
    kept_rows = np.array([lengths[doc] for doc in kept] + [0])
    kept_ms = np.append([sum(span_us(lengths[doc], 1, heads, head_dim)) / 1e3 for doc in kept], 0.0)
    nothing = len(kept)

    def pairs_on(rank: int) -> np.ndarray:
        on = np.flatnonzero(home == rank)
        left, right = np.triu_indices(len(on), 1)
        return np.stack([on[left], on[right]], axis=1)

    pairs = [pairs_on(rank) for rank in range(world)]
    for _ in range(4 * world):  # each trade lowers the most loaded rank; a bound, seldom reached
        top = int(loads.argmax())
        given = np.flatnonzero(home == top)
        others = np.flatnonzero(home != top)
        taken = np.concatenate([
            np.full((world, 2), nothing), np.stack([others, np.full(len(others), nothing)], axis=1),
            *(pairs[rank] for rank in range(world) if rank != top),
        ])
        to = np.concatenate([np.arange(world), home[others], *(home[pairs[rank][:, 0]] for rank in range(world) if rank != top)])
        rows_moved = kept_rows[given][:, None] - kept_rows[taken].sum(axis=1)[None, :]
        ms_moved = kept_ms[given][:, None] - kept_ms[taken].sum(axis=1)[None, :]
        fits = (rows[to] + rows_moved <= capacity) & (rows[top] - rows_moved <= capacity) & (ms_moved > 0) & (to != top)
        larger = np.where(fits, np.maximum(loads[top] - ms_moved, loads[to] + ms_moved), np.inf)
        if not larger.size or larger.min() >= loads[top] * (1 - 1e-9):
            break
        which, trade = np.unravel_index(int(larger.argmin()), larger.shape)
        receiver, gone, back = int(to[trade]), int(given[which]), [doc for doc in taken[trade] if doc != nothing]
        home[gone], home[back] = receiver, top
        loads[top] -= ms_moved[which, trade]
        loads[receiver] += ms_moved[which, trade]
        rows[top] -= rows_moved[which, trade]
        rows[receiver] += rows_moved[which, trade]
        pairs[top], pairs[receiver] = pairs_on(top), pairs_on(receiver)
    for doc, rank in zip(kept.tolist(), home.tolist()):
        spans[doc] = (rank, 1)
    return BalancedSharding(world, lengths, tuple(spans), int(rows.max()))
