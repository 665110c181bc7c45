"""The packed-document mixes the benchmarks share: lengths drawn log-normal until the total is
filled, the last document cut. Pretraining-like: median 1,200 tokens, sigma 1.4, capped at 64K;
fine-tuning-like: median 500, sigma 0.9, capped at 16K."""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator

MIXES = {"pretrain": (1200, 1.4, 65536), "finetune": (500, 0.9, 16384)}


def lognormal_lengths(total: int, mix: str, seed: int = 0) -> list[int]:
    median, sigma, cap = MIXES[mix]
    generator, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(max(1, min(cap, int(generator.lognormvariate(math.log(median), sigma)))))
    lengths[-1] -= sum(lengths) - total
    return lengths


def add_mix_arguments(parser: argparse.ArgumentParser, world_sizes: list[int]) -> None:
    """--world-sizes and --mixes, as every benchmark over the mixes takes them."""
    parser.add_argument("--world-sizes", type=int, nargs="+", default=world_sizes)
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))


def batches(mixes: list[str], world_sizes: list[int], tokens_per_rank: int) -> Iterator[tuple[str, int, list[int]]]:
    """(mix, W, lengths) of each batch: W ranks' tokens drawn from the mix, seeded by W, so that
    every benchmark sees the same documents for a mix and ring size."""
    for mix in mixes:
        for world_size in world_sizes:
            yield mix, world_size, lognormal_lengths(tokens_per_rank * world_size, mix, seed=world_size)
