"""The packed-document mixes the benchmarks share: lengths drawn log-normal until the total is
filled, the last document cut. Pretraining-like: median 1,200 tokens, sigma 1.4, capped at 64K;
fine-tuning-like: median 500, sigma 0.9, capped at 16K."""

from __future__ import annotations

import math
import random

MIXES = {"pretrain": (1200, 1.4, 65536), "finetune": (500, 0.9, 16384)}


def lognormal_lengths(total: int, mix: str, seed: int = 0) -> list[int]:
    median, sigma, cap = MIXES[mix]
    generator, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(max(1, min(cap, int(generator.lognormvariate(math.log(median), sigma)))))
    lengths[-1] -= sum(lengths) - total
    return lengths
