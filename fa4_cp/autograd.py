"""Autograd for the ring: the forward saves the final (out, lse); the backward runs the ring again.
Sinks, if any, join the final result once (sinks.py)."""

from __future__ import annotations

import torch

from .parallel.executor import Ring, ring_backward, ring_forward
from .sinks import add_sinks, sinks_grad


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, ring: Ring
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_acc, lse = ring_forward(ring, q, k, v)
        if sinks is not None:
            lse = add_sinks(out_acc, lse, sinks.detach())
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        # A reduction's gradient arrives broadcast (stride 0); kernels need dense rows.
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = ring_backward(ctx.ring, q, k, v, out, lse, dout, dlse)
        dsinks = sinks_grad(out, lse, dout, dlse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq.to(q.dtype), dk, dv, dsinks, None
