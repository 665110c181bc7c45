"""Merging attention partials through their log-sum-exp, in PyTorch."""

from __future__ import annotations

import torch


def merged_lse(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) as max + log1p(exp(min - max)); -inf where both are -inf."""
    high = torch.maximum(lse_a, lse_b)
    low = torch.minimum(lse_a, lse_b)
    both_empty = high == float("-inf")
    gap = torch.where(both_empty, torch.zeros_like(low), low - high)
    return torch.where(both_empty, high, high + torch.log1p(torch.exp(gap)))


def merge_partials_(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out_part: torch.Tensor,
    lse_part: torch.Tensor,
) -> None:
    """Fold a partial (out_part, lse_part) into (out_acc, lse_acc) in place.

    Each lse has the shape of its out without the last dim, in the same order (..., s, h); the
    caller passes lse views transposed to match. A row whose lse_acc is -inf has seen no key yet:
    its out_acc is not read (it may be unset), the partial replaces it.
    """
    lse_new = merged_lse(lse_acc, lse_part)
    empty = lse_new == float("-inf")
    weight_acc = torch.where(empty, 0.0, torch.exp(lse_acc - lse_new)).unsqueeze(-1)
    weight_part = torch.where(empty, 0.0, torch.exp(lse_part - lse_new)).unsqueeze(-1)
    prior = torch.where((lse_acc == float("-inf")).unsqueeze(-1), 0.0, out_acc * weight_acc)
    out_acc.copy_(prior.add_(out_part.to(out_acc.dtype) * weight_part))
    lse_acc.copy_(lse_new)
