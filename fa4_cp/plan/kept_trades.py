"""Kept documents traded off the most loaded rank, once the greedy (placement.py) has placed every
document: placing longest first, the greedy's last short documents land wherever rows are left,
so a rank can end a few kept documents heavier than the rest.

A trade hands one kept document of the most loaded rank to another rank, for nothing or for one
or two of that rank's kept documents, where it lowers the larger load of the two ranks
(placement.rank_costs_ms at the ring rank's heads) and both stay within the greedy's row limit.
Trades repeat while the most loaded rank gets lighter. A kept document adds nothing to a rank's
remote launches, which cover only the spread documents' rows (VarlenRows.computed_sequences).

The search is by rows: every rank is near the row limit, so what a document can be traded for
must have nearly its rows. For each offer of another rank (nothing, one document, a pair), the
most loaded rank's documents whose rows fit form a run of them sorted by length, and a kept
document's cost grows with its length, so the best of that run is found by bisection: one pass
over the offers per trade, not every offer against every document.

Replayed on an H100 beside the greedy's choice (bench/results/nvidia_h100_2026-12-06_s20/
placement_replay.json.gz): fine-tuning-like W = 16, the slowest rank 1.401 -> 1.356 ms.
"""

from __future__ import annotations

import math

import numpy as np

from ..tuning.kernel_cost import TILE, span_us


def kept_documents_traded(
    lengths: tuple[int, ...], spans: tuple[tuple[int, int], ...], loads: np.ndarray, rows: np.ndarray, heads: int, head_dim: int,
    most_trades: int | None = None,
) -> tuple[tuple[tuple[int, int], ...], int]:
    """The spans with kept documents traded, and the most local rows a rank has after.
    `loads`: each rank's modelled forward + backward ms; `rows`: its local rows; `most_trades`:
    2W unless given (each trade lowers the most loaded rank; the bound keeps the host time near
    the greedy's, where W more trades would add a little on fine-tuning-like mixes at W = 64)."""
    world = len(loads)
    kept = np.array([doc for doc, (_, ranks) in enumerate(spans) if ranks == 1], dtype=np.int64)
    if world == 1 or not kept.size:
        return spans, int(rows.max())
    loads, rows = np.array(loads, dtype=np.float64), np.array(rows, dtype=np.int64)
    capacity = math.ceil(sum(lengths) / world) + TILE
    kept_rows = np.array([lengths[doc] for doc in kept])
    kept_ms = np.array([sum(span_us(lengths[doc], 1, heads, head_dim)) / 1e3 for doc in kept])
    home = np.array([spans[doc][0] for doc in kept])
    offers = [_offers(rank, np.flatnonzero(home == rank), kept_rows, kept_ms) for rank in range(world)]
    for _ in range(2 * world if most_trades is None else most_trades):
        top = int(loads.argmax())
        given = np.flatnonzero(home == top)
        if not given.size:
            break  # the most loaded rank keeps no document whole: nothing to trade
        given = given[np.argsort(kept_rows[given], kind="stable")]  # by rows, so by cost too
        given_rows, given_ms = kept_rows[given], kept_ms[given]
        others = offers[:top] + offers[top + 1:]
        to, taken, back_rows, back_ms = (np.concatenate([offer[part] for offer in others]) for part in range(4))
        # the given documents whose rows keep both ranks within the limit: a run [first, last)
        first = np.searchsorted(given_rows, back_rows - (capacity - rows[top]), side="left")
        last = np.searchsorted(given_rows, back_rows + (capacity - rows[to]), side="right")
        # within it, the document nearest the cost that would even the two ranks out, or its neighbour
        ideal = np.searchsorted(given_ms, back_ms + (loads[top] - loads[to]) / 2)
        best, larger = np.zeros(len(to), dtype=np.int64), np.full(len(to), np.inf)
        for pick in (np.clip(ideal - 1, first, last - 1), np.clip(ideal, first, last - 1)):
            moved = given_ms[np.clip(pick, 0, len(given) - 1)] - back_ms
            result = np.where((first < last) & (moved > 0), np.maximum(loads[top] - moved, loads[to] + moved), np.inf)
            better = result < larger
            best, larger = np.where(better, pick, best), np.where(better, result, larger)
        option = int(larger.argmin())  # every other rank offers at least nothing
        if larger[option] >= loads[top] * (1 - 1e-9):
            break
        receiver, gone = int(to[option]), int(given[best[option]])
        back = [doc for doc in taken[option] if doc >= 0]
        rows_moved = kept_rows[gone] - back_rows[option]
        ms_moved = kept_ms[gone] - back_ms[option]
        home[gone], home[back] = receiver, top
        loads[top] -= ms_moved
        loads[receiver] += ms_moved
        rows[top] -= rows_moved
        rows[receiver] += rows_moved
        for rank in (top, receiver):
            offers[rank] = _offers(rank, np.flatnonzero(home == rank), kept_rows, kept_ms)
    traded_spans = list(spans)
    for doc, rank in zip(kept.tolist(), home.tolist()):
        traded_spans[doc] = (rank, 1)
    return tuple(traded_spans), int(rows.max())


def _offers(rank: int, there: np.ndarray, kept_rows: np.ndarray, kept_ms: np.ndarray) -> tuple[np.ndarray, ...]:
    """What `rank`, holding kept documents `there` (indices into the kept ones), can hand back for
    one of them: nothing, each one, each pair. (the rank per offer; indices (n, 2), -1 for none;
    their rows; their ms)"""
    left, right = np.triu_indices(len(there), 1)
    taken = np.concatenate([
        np.full((1, 2), -1), np.stack([there, np.full(len(there), -1)], axis=1), np.stack([there[left], there[right]], axis=1),
    ])
    some = taken >= 0
    return (
        np.full(len(taken), rank), taken, np.where(some, kept_rows[taken], 0).sum(axis=1), np.where(some, kept_ms[taken], 0.0).sum(axis=1),
    )
