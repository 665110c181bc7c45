"""What the ring's attention kernels cost: the cost that the balanced placement and the 2-D split's
model use in place of raw tile counts, and what one device's upstream FA4 costs, the ideal they
are held against. Causal, bf16, 64:8 heads, d 128; other head counts and head dims scale the
tiles' costs and the per-call work linearly (heads x head_dim / (64 x 128)), but not what a
launch or a ring step costs beside them: a replay of every candidate placement at 32 and at 4
heads per ring rank (bench/results/nvidia_h100_2026-12-06_s18/placement_replay.json.gz, fitted by
bench/fit_placement_costs.py into fit_placement_costs.json there) fits a remote launch as a cost
of its own (median error 6.3% forward, 2.6% backward) better than one per 64 heads (9.6%, 4.2%).
Scaled, the model had put a 4-head ring rank's 7 remote launches at a sixteenth of their cost
and chosen, for an 8 x 8 split, a placement 5.6% slower than the fastest candidate.

One device's upstream FA4 varlen, fitted by least squares on the four log-normal mixes of
bench/results/nvidia_h200_2026-12-01/varlen_packed_2026-12-01.json.gz (8K tokens x W = 8, 16, 32,
64, on an H200), per 128 x 128 tile of all 64 heads: forward 0.884 us per tile pair; backward
2.383 us per tile pair plus 3.828 per KV tile (1.00-1.08 of the measured times). FA4's sm90
backward runs one CTA per (KV tile, head), whose fixed cost a short q piece does not amortize.

The ring's kernels, anchored on those costs and fitted by bench/fit_replay_costs.py on the
per-step attention times of a one-GPU replay of the ring (both packed mixes, W = 8, 16, 32 and
64 in the splits plan_mesh picked, 1927 active steps, on an H200, with the forward's q heads
packed and the kept documents written finished:
bench/results/nvidia_h200_2026-12-06/fit_replay_costs_staged.json.gz):
- forward: one device's cost plus 1.28 us per q tile and 37.8 us per launch (median error 5.8%,
  where one device's alone gives 19%): the merging epilogue reads and writes each q tile's fp32
  out once per block, so a short piece of q costs more than its pairs (3.03 us per q tile and
  23.1 per launch on an H100 before the forward packed q heads: nvidia_h100_2026-12-05/
  s11_fit_replay_costs_anchored.json.gz);
- backward: one device's cost (median error 12%, 9% over the measured times on average; a free
  fit puts the ring's steps under one device's, which a model held against one device must not).
- beside attention (fills, the dq read-back, the dK/dV finish, copies), fitted on every rank of an
  H100 replay of both mixes at W = 8-64, plain rings of 8-32 active steps among them, as a cost per
  call and one per active step: 353 us per call (at 8K tokens of 64 heads per rank) and 22.3 us per
  step, forward and backward together (median error 8%;
  bench/results/nvidia_h100_2026-12-06_s14/fit_replay_costs.json, `beside_attention`). Until then
  the model charged 137 us per step and nothing per call (that replay's fine-tuning-like W = 8
  ranks' time beside attention over their steps), which a 2-step rank bore about right and a
  32-step rank about 4x over.
- what a rank's remote blocks cost it beside their tiles (`remote_us`), fitted on every rank of
  the fine-tuning-like mix in an H100 replay (W = 8-64, 120 ranks) as the rank's time beyond its
  modelled attention: 120 us forward and 150 backward once it has any (its blocks no longer
  write out and dK/dV finished, so fp32 accumulators, fills, the read-back and the finish run)
  and per (step, stream) of remote blocks 47.8 us forward and 45.5 backward at any heads (the
  placement replay above, with a constant per batch; at 64 heads the fine-tuning-like ranks had
  given 45 + 28 us, fwd + bwd median error 1.5%: bench/results/nvidia_h100_2026-12-06_s16/
  fit_replay_costs*.json, `remote_blocks`). With it the model finds the replays' measured
  imbalance (1.07-1.09 modelled against 1.09-1.16 measured, fine-tuning-like W = 16-64, where the
  attention alone gives 1.00-1.03). It carries the ring's launches per rank, so plan_mesh charges
  a step only its work beside attention for packed documents.
So a short piece of a long document costs more per FLOP than a whole short document, and every
ring step that a document's span adds costs each rank its launches and its fixed work. A free fit
of the same steps (s11_fit_replay_costs.json.gz) has smaller errors (3-3.5%) but trades the
per-pair cost against the per-tile ones and puts long blocks under upstream's cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TILE = 128
CALIBRATED_HEADS, CALIBRATED_HEAD_DIM, CALIBRATED_TOKENS = 64, 128, 8192


@dataclass(frozen=True)
class KernelCosts:
    """us per unit: of all 64 heads at d 128 for tiles and per-call work; as they are for launches
    and steps (`launch`, `step_other`, `remote_launch`), which cost the same at any heads."""

    forward_pair: float
    forward_q_tile: float
    backward_pair: float
    backward_kv_tile: float
    launch: float = 0.0
    """Per ring step (the forward's; the backward's is within its fit's error)."""
    step_other: float = 0.0
    """Per ring step, the kernels and gaps beside attention (forward + backward)."""
    call_other: float = 0.0
    """Per call, the kernels beside attention that do not grow with the steps (forward +
    backward), at 8K tokens per rank: they scale with a rank's tokens."""
    remote_fixed: tuple[float, float] = (0.0, 0.0)
    """(forward, backward) per rank with any block against another rank's KV."""
    remote_launch: tuple[float, float] = (0.0, 0.0)
    """(forward, backward) per (step, stream) at which a rank has blocks against another rank's KV."""


RING = KernelCosts(
    forward_pair=0.884, forward_q_tile=1.28, backward_pair=2.383, backward_kv_tile=3.828, launch=37.8, step_other=22.3, call_other=353.0,
    remote_fixed=(120.0, 150.0), remote_launch=(47.8, 45.5),
)
ONE_DEVICE = KernelCosts(forward_pair=0.884, forward_q_tile=0.0, backward_pair=2.383, backward_kv_tile=3.828)


def tiles(rows: int) -> int:
    return -(-rows // TILE)


def triangle(n: int) -> int:
    return n * (n + 1) // 2


def _scale(heads: int, head_dim: int) -> float:
    return heads * head_dim / (CALIBRATED_HEADS * CALIBRATED_HEAD_DIM)


def block_us(
    pairs: float, q_tiles: float, kv_tiles: float, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM,
    costs: KernelCosts = RING,
) -> tuple[float, float]:
    """(forward, backward) us of attention blocks of `pairs` tile pairs over `q_tiles` q and `kv_tiles` KV tiles."""
    scale = _scale(heads, head_dim)
    return (
        scale * (costs.forward_pair * pairs + costs.forward_q_tile * q_tiles),
        scale * (costs.backward_pair * pairs + costs.backward_kv_tile * kv_tiles),
    )


def step_us() -> float:
    """What one more ring step costs every rank: its forward launch, and the work and gaps beside
    attention (the placement's cost of widening a span, charged to every rank alike). Launches and
    gaps cost the same at any heads."""
    return RING.launch + RING.step_other


def step_other_us() -> float:
    """What one more ring step costs every rank beside its blocks' launches: the work and gaps
    beside attention (a rank's remote launches are its own: `remote_us`)."""
    return RING.step_other


def remote_us(launches, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM) -> tuple:
    """(forward, backward) of what a rank's remote blocks cost it beside their tile work, for
    `launches` (an int or an array) (step, stream) pairs of them: the fixed cost of leaving the
    all-local path, which moves the rank's heads x rows (scaled by heads), then each launch (not)."""
    return tuple(
        _scale(heads, head_dim) * (launches > 0) * fixed + launches * launch for fixed, launch in zip(RING.remote_fixed, RING.remote_launch)
    )


def span_tiles(length: int, ranks: int) -> tuple[float, float, float]:
    """(tile pairs, q tiles, KV tiles) of a document's causal attention on each rank of a span of
    `ranks` (placement.py: kept whole when 1; else 2 x ranks zigzag chunks, two per rank). A rank
    meets each other rank of the span once: its two chunks against an earlier peer's first chunk
    (2c q rows, c KV rows), or its later chunk against a later peer's two (c q rows, 2c KV rows);
    and its own two chunks at step 0. Remote steps are counted as their mean over the span."""
    if ranks == 1:
        return triangle(tiles(length)), tiles(length), tiles(length)
    chunk = math.ceil(length / (2 * ranks))
    one, two = tiles(chunk), tiles(2 * chunk)
    remote_pairs, remote_edge = two * one, (one + two) / 2  # a remote step's q tiles, as its KV tiles
    return (
        (ranks - 1) * remote_pairs + triangle(two),
        (ranks - 1) * remote_edge + two,
        (ranks - 1) * remote_edge + two,
    )


def span_us(
    length: int, ranks: int, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM, costs: KernelCosts = RING,
) -> tuple[float, float]:
    """(forward, backward) us of the ring's kernels on a document, on each rank of a span of `ranks`."""
    return block_us(*span_tiles(length, ranks), heads, head_dim, costs)


def one_device_us(length: int, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM) -> tuple[float, float]:
    """(forward, backward) us of upstream FA4 on a whole document on one device."""
    return block_us(*span_tiles(length, 1), heads, head_dim, costs=ONE_DEVICE)
