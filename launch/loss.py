"""Chunked cross-entropy: the output projection and the loss run `chunk` tokens at a time, and
each chunk is recomputed in backward, so [S, V] logits never exist (not even for autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of token losses over (b, s, d) hidden states and (b, s) labels (IGNORE_INDEX skipped)."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss_sum, hidden[part], weight, labels[part], use_reentrant=False)
    return total
