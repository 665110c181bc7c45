"""Autograd for the ring: the forward saves the final (out, lse); the backward runs the ring again."""

from __future__ import annotations

import torch
from einops import rearrange

from .kernels import accumulator_dtype
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
        if dout is None:
            dout = torch.zeros_like(out)
        # dS = P * (dP - delta) + P * dlse, so an lse gradient folds into delta, computed once per call.
        dtype = accumulator_dtype(q.dtype)
        delta = rearrange((dout.to(dtype) * out.to(dtype)).sum(-1), "... s h -> ... h s")
        if dlse is not None:
            delta = delta - dlse
        dq, dk, dv = ring_backward(ctx.ring, q, k, v, out, lse, dout, delta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
