"""Autograd for the ring: the forward saves the final (out, lse); the backward runs the ring again."""

from __future__ import annotations

import torch

from .parallel.executor import Ring, ring_backward, ring_forward


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> tuple[torch.Tensor, torch.Tensor]:
        out_acc, lse = ring_forward(ring, q, k, v)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        # A reduction's gradient arrives broadcast (stride 0); kernels need dense rows.
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = ring_backward(ctx.ring, q, k, v, out, lse, dout, dlse)
        return dq.to(q.dtype), dk, dv, None
