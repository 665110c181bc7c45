"""Kept documents traded between ranks, once the greedy (placement.py) has placed every document:
placing longest first, the greedy's last short documents land wherever rows are left, so a rank
can end a few kept documents heavier than the rest.

A trade hands one kept document of a loaded rank to another rank, for nothing or for one or two
of that rank's kept documents, and both ranks stay within the greedy's row limit. A kept document
adds nothing to a rank's remote launches, which cover only the spread documents' rows
(VarlenRows.computed_sequences), so a trade moves only its documents' modelled ms
(placement.rank_costs_ms at the ring rank's heads). Two rounds:
- the ranks' loads evened: trades off the most loaded rank (forward + backward) while it gets
  lighter;
- the passes' maxima lowered: the ring waits for each pass's most loaded rank, and a rank of
  many remote steps is heavier in the forward than its share of forward + backward says. Trades
  off the forward's or the backward's most loaded rank while the sum of the two maxima falls
  (pairs taken back only from ranks that keep few documents: PAIRS_UP_TO).
  Trades by this measure alone from the greedy's placement stall where two ranks tie for a
  maximum; after the first round they lower it further (fine-tuning-like, the attention kernels
  modelled: W = 32 2.43 -> 2.37 ms, W = 72 3.01 -> 2.93).

The search is by rows: every rank is near the row limit, so what a document can be traded for
must have nearly its rows. For each offer of another rank (nothing, one document, a pair), the
loaded rank's documents whose rows fit form a run of them sorted by length. In the first round a
kept document's cost grows with its length, so the best of that run is found by bisection; in
the second, with two maxima, every document of the run is tried (runs are a few documents wide).

Replayed on an H100 against the layout before any trades, in one call (bench/results/
nvidia_h100_2026-12-06_s21/, MagiAttention's metric): fine-tuning-like per-rank imbalance 1.058 /
1.086 / 1.101 -> 1.040 / 1.045 / 1.065 at W = 16 / 32 / 64; the forward's remote launches, which
no trade of kept documents moves, keep its own at 1.13-1.17.
"""

from __future__ import annotations

import math

import numpy as np

from ..tuning.kernel_cost import TILE, span_us

# The second round takes pairs of documents back only from ranks that keep at most this many: an
# 8 x 8 split's fine-tuning-like ring ranks keep about 90 each, 4,000 pairs a rank, and pairing
# them took 0.3-0.9 s of host time a batch for 0.01% of the modelled time
PAIRS_UP_TO = 32


def kept_documents_traded(
    lengths: tuple[int, ...], spans: tuple[tuple[int, int], ...], costs: np.ndarray, rows: np.ndarray, heads: int, head_dim: int,
) -> tuple[tuple[tuple[int, int], ...], int]:
    """The spans with kept documents traded, and the most local rows a rank has after.
    `costs`: each rank's modelled (forward, backward) ms; `rows`: its local rows. At most 2W
    trades evening the loads and W lowering the passes' maxima: each lowers what the ring waits
    for, and the bound keeps the host time near the greedy's."""
    trades = KeptDocuments(lengths, spans, costs, rows, heads, head_dim)
    trades.even_loads(2 * len(rows))
    trades.lower_pass_maxima(len(rows))
    return trades.spans(), int(trades.rows.max())


class KeptDocuments:
    """The kept documents, the ranks that hold them, and every rank's modelled ms and rows as
    trades move them."""

    def __init__(
        self, lengths: tuple[int, ...], spans: tuple[tuple[int, int], ...], costs: np.ndarray, rows: np.ndarray, heads: int, head_dim: int,
    ):
        self.original = spans
        self.costs, self.rows = np.array(costs, dtype=np.float64).reshape(-1, 2), np.array(rows, dtype=np.int64)
        world = len(self.rows)
        self.capacity = math.ceil(sum(lengths) / world) + TILE
        self.kept = np.array([doc for doc, (_, ranks) in enumerate(spans) if ranks == 1], dtype=np.int64)
        self.kept_rows = np.array([lengths[doc] for doc in self.kept], dtype=np.int64)
        self.kept_ms = np.array([span_us(lengths[doc], 1, heads, head_dim) for doc in self.kept], dtype=np.float64).reshape(-1, 2) / 1e3
        self.home = np.array([spans[doc][0] for doc in self.kept], dtype=np.int64)
        # no offers, no trades: one rank, or no document kept whole
        self.offers = [self._offers(rank) for rank in range(world)] if world > 1 and self.kept.size else []

    def spans(self) -> tuple[tuple[int, int], ...]:
        traded = list(self.original)
        for doc, rank in zip(self.kept.tolist(), self.home.tolist()):
            traded[doc] = (rank, 1)
        return tuple(traded)

    def even_loads(self, most_trades: int) -> None:
        """Trades off the most loaded rank (forward + backward) while it gets lighter."""
        for _ in range(most_trades if self.offers else 0):
            loads = self.costs.sum(axis=1)
            top = int(loads.argmax())
            run = self._fitting_run(top)
            if run is None:
                break  # the most loaded rank keeps no document whole: nothing to trade
            given, first, last, to, taken, back_ms = run
            given_ms, back = self.kept_ms[given].sum(axis=1), back_ms.sum(axis=1)
            # within the run, the document nearest the cost that would even the two ranks out, or its neighbour
            ideal = np.searchsorted(given_ms, back + (loads[top] - loads[to]) / 2)
            best, larger = np.zeros(len(to), dtype=np.int64), np.full(len(to), np.inf)
            for pick in (np.clip(ideal - 1, first, last - 1), np.clip(ideal, first, last - 1)):
                moved = given_ms[np.clip(pick, 0, len(given) - 1)] - back
                result = np.where((first < last) & (moved > 0), np.maximum(loads[top] - moved, loads[to] + moved), np.inf)
                better = result < larger
                best, larger = np.where(better, pick, best), np.where(better, result, larger)
            option = int(larger.argmin())  # every other rank offers at least nothing
            if larger[option] >= loads[top] * (1 - 1e-9):
                break
            self._trade(top, int(to[option]), int(given[best[option]]), taken[option])

    def lower_pass_maxima(self, most_trades: int) -> None:
        """Trades off the forward's or the backward's most loaded rank while the sum of the two
        passes' maxima falls."""
        for _ in range(most_trades if self.offers else 0):
            passes = self.costs.max(axis=0).sum()
            best, choice = passes * (1 - 1e-9), None
            paired = np.bincount(self.home, minlength=len(self.rows)) <= PAIRS_UP_TO  # per rank: takes pairs back
            for top in sorted(set(self.costs.argmax(axis=0).tolist())):
                run = self._fitting_run(top)
                if run is None:
                    continue
                given, first, last, to, taken, back_ms = run
                # every (offer, document of its run) pair: the runs are a few documents wide; pairs
                # only from ranks that keep few documents (one that keeps many has fine steps singly)
                offered = (taken[:, 1] < 0) | paired[to]
                widths = np.where(offered, np.maximum(last - first, 0), 0)
                option = np.repeat(np.arange(len(to)), widths)
                if not option.size:
                    continue
                document = first[option] + np.arange(option.size) - np.repeat(np.cumsum(widths) - widths, widths)
                moved = self.kept_ms[given[document]] - back_ms[option]  # (pair, pass)
                receiver = to[option]
                after = np.maximum(np.maximum(_maxima_without(self.costs, top, to)[option], self.costs[top] - moved), self.costs[receiver] + moved)
                pair = int(after.sum(axis=1).argmin())
                if after[pair].sum() < best:
                    best = after[pair].sum()
                    choice = (top, int(receiver[pair]), int(given[document[pair]]), taken[option[pair]])
            if choice is None:
                break
            self._trade(*choice)

    def _fitting_run(self, top: int):
        """`top`'s kept documents by rows, every other rank's offers, and per offer the run
        [first, last) of those documents whose rows keep both ranks within the limit; None if
        `top` keeps none."""
        given = np.flatnonzero(self.home == top)
        if not given.size:
            return None
        given = given[np.argsort(self.kept_rows[given], kind="stable")]  # by rows, so by cost too
        others = self.offers[:top] + self.offers[top + 1:]
        to, taken, back_rows, back_ms = (np.concatenate([offer[part] for offer in others]) for part in range(4))
        given_rows = self.kept_rows[given]
        first = np.searchsorted(given_rows, back_rows - (self.capacity - self.rows[top]), side="left")
        last = np.searchsorted(given_rows, back_rows + (self.capacity - self.rows[to]), side="right")
        return given, first, last, to, taken, back_ms

    def _trade(self, top: int, receiver: int, gone: int, taken: np.ndarray) -> None:
        back = [doc for doc in taken.tolist() if doc >= 0]
        rows_moved = self.kept_rows[gone] - self.kept_rows[back].sum()
        ms_moved = self.kept_ms[gone] - self.kept_ms[back].sum(axis=0)
        self.home[gone], self.home[back] = receiver, top
        self.costs[top] -= ms_moved
        self.costs[receiver] += ms_moved
        self.rows[top] -= rows_moved
        self.rows[receiver] += rows_moved
        for rank in (top, receiver):
            self.offers[rank] = self._offers(rank)

    def _offers(self, rank: int) -> tuple[np.ndarray, ...]:
        """What `rank` can hand back for a document: nothing, each of its kept documents, each
        pair. (the rank per offer; indices into the kept documents (n, 2), -1 for none; their
        rows; their (forward, backward) ms)"""
        there = np.flatnonzero(self.home == rank)
        left, right = np.triu_indices(len(there), 1)
        taken = np.concatenate([
            np.full((1, 2), -1), np.stack([there, np.full(len(there), -1)], axis=1), np.stack([there[left], there[right]], axis=1),
        ])
        some = taken >= 0
        return (
            np.full(len(taken), rank), taken, np.where(some, self.kept_rows[taken], 0).sum(axis=1),
            np.where(some[:, :, None], self.kept_ms[taken], 0.0).sum(axis=1),
        )


def _maxima_without(costs: np.ndarray, top: int, to: np.ndarray) -> np.ndarray:
    """Per receiver in `to`, each pass's most loaded rank's ms among the ranks other than `top`
    and it: the largest of the three heaviest that is neither. (len(to), 2)"""
    maxima = np.full((len(to), 2), -np.inf)
    for part in range(2):
        found = np.zeros(len(to), dtype=bool)
        for rank in np.argsort(-costs[:, part], kind="stable")[:3].tolist():
            use = ~found & (to != rank) & (rank != top)
            maxima[use, part] = costs[rank, part]
            found |= use
    return maxima
