"""What FA4's attention kernels cost, from one-device runs: the cost that the balanced placement
and the 2-D split's model use in place of raw tile counts.

Fitted by least squares on upstream FA4 varlen (causal, bf16, 64:8 heads, d 128) on one H200, over
the four log-normal mixes of bench/results/nvidia_h200_2026-12-01/varlen_packed_2026-12-01.json.gz
(8K tokens x W = 8, 16, 32, 64; lengths rebuilt by bench/varlen.py):
- forward: 0.884 us per 128 x 128 tile pair of all 64 heads; 1.08, 1.01, 0.99, 1.00 of the four
  measured times;
- backward: 2.383 us per q-tile iteration (one tile pair) plus 3.828 us per KV tile, 1.61
  iterations: FA4's sm90 backward runs one CTA per (KV tile, head), whose fixed cost a short q
  piece against it does not amortize; 1.03, 1.01, 1.00, 1.00 of the four.
So a short piece of a long document costs more per FLOP than a whole short document: this, more
than padding, is what cutting documents finely costs. Other head counts and head dims scale the
cost linearly (heads x head_dim / (64 x 128)), an assumption not yet measured.
"""

from __future__ import annotations

import math

TILE = 128
FORWARD_US_PER_PAIR = 0.884
BACKWARD_US_PER_PAIR = 2.383
BACKWARD_US_PER_KV_TILE = 3.828
CALIBRATED_HEADS, CALIBRATED_HEAD_DIM = 64, 128


def tiles(rows: int) -> int:
    return -(-rows // TILE)


def triangle(n: int) -> int:
    return n * (n + 1) // 2


def block_us(pairs: float, kv_tiles: float, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM) -> tuple[float, float]:
    """(forward, backward) us of attention blocks of `pairs` tile pairs over `kv_tiles` KV tiles."""
    scale = heads * head_dim / (CALIBRATED_HEADS * CALIBRATED_HEAD_DIM)
    return scale * FORWARD_US_PER_PAIR * pairs, scale * (BACKWARD_US_PER_PAIR * pairs + BACKWARD_US_PER_KV_TILE * kv_tiles)


def span_tiles(length: int, ranks: int) -> tuple[float, float]:
    """(tile pairs, KV tiles) of a document's causal attention on each rank of a span of `ranks`
    (placement.py: kept whole when 1; else 2 x ranks zigzag chunks, two per rank). A rank meets
    each other rank of the span once: its two chunks against one earlier chunk of the peer (c x c
    pairs twice, or 2c x c), over c or 2c KV rows; and its own two chunks at step 0."""
    if ranks == 1:
        return triangle(tiles(length)), tiles(length)
    chunk = math.ceil(length / (2 * ranks))
    remote_pairs, remote_kv = tiles(2 * chunk) * tiles(chunk), (tiles(chunk) + tiles(2 * chunk)) / 2
    return (ranks - 1) * remote_pairs + triangle(tiles(2 * chunk)), (ranks - 1) * remote_kv + tiles(2 * chunk)


def span_us(length: int, ranks: int, heads: int = CALIBRATED_HEADS, head_dim: int = CALIBRATED_HEAD_DIM) -> tuple[float, float]:
    """(forward, backward) us of a document on each rank of a span of `ranks`."""
    return block_us(*span_tiles(length, ranks), heads, head_dim)
