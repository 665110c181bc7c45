"""Attention sinks (gpt-oss): a per-head logit s_h in every row's softmax, with a zero value.

A sink adds exp(s_h) to a row's denominator and nothing to its numerator, so it enters once, on
the ring's final result, not at each step: the row's LSE L becomes L' = log(exp(L) + exp(s_h))
and its output is scaled by exp(L - L'). Per step it would have to join exactly one of the W
partial LSEs, and in a kernel it would tie the kernels to the ring's last step; here every
backend gets it for free, at one elementwise pass per call.

The ring's backward from (out', L') is then already the backward with sinks: its probabilities
exp(S - L') are the sink-normalised ones, and delta = rowsum(dO * O') - dL' is still their
dP-weighted sum, since the sink's dP is zero. The sink's own gradient follows from the same
delta: dL/ds_h = sum_i P_i,sink * (0 - delta_i) = -sum_i exp(s_h - L'_i) * delta_i.

A rank's share of that sum can be far larger than the total (the shares cancel), so rounding
each share to the sinks' 16-bit dtype would cost up to W half-ulps of the shares; so would W
copies of a rounded total / W, for W not a power of two. The shares are therefore summed over the
ring in fp32; ring rank 0 returns the total and the others zero. The ranks' gradients still sum
to dL/ds, as a replicated weight's must, with one rounding, as on one device, whatever W.

Rows that see no key (varlen padding) keep L = -inf and out = 0.
"""

from __future__ import annotations

import torch

from .comm.group import RingGroup


def _per_row(sinks: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(h,) sinks against lse (b, h, s) or (h, total), in lse's dtype."""
    return sinks.to(lse.dtype).view(-1, 1)


def _out_layout(row_values: torch.Tensor) -> torch.Tensor:
    """Per-row values (..., h, s) broadcast against out (..., s, h, d)."""
    return row_values.transpose(-1, -2).unsqueeze(-1)


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Join the sinks into the final (out, lse) in place; returns lse'."""
    seen = lse > float("-inf")
    with_sinks = torch.where(seen, torch.logaddexp(lse, _per_row(sinks, lse)), lse)
    scale = torch.where(seen, torch.exp(lse - with_sinks), 0.0)
    out.mul_(_out_layout(scale).to(out.dtype))
    lse.copy_(with_sinks)
    return lse


def sinks_grad(
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, sinks: torch.Tensor, group: RingGroup
) -> torch.Tensor:
    """dL/ds over the ring's rows on ring rank 0, zeros elsewhere, from each rank's final (out', L')
    and their gradients."""
    math = torch.float64  # sums over every row of the ring: as wide as the running LSE (the saved one is rounded)
    delta = (dout.to(math) * out.to(math)).sum(-1).transpose(-1, -2)  # (..., h, s)
    if dlse is not None:
        delta = delta - dlse.to(math)
    sink_probability = torch.where(lse > float("-inf"), torch.exp(_per_row(sinks, lse) - lse), 0.0)
    per_head = -(sink_probability * delta)
    share = per_head.sum(dim=-1).reshape(-1, per_head.shape[-2]).sum(0)
    total = torch.stack(group.all_gather(share, "the all-gather of the sinks' gradient")).sum(0)
    return total.to(sinks.dtype) if group.rank == 0 else torch.zeros_like(sinks)
