"""PyTorch reference backend: the numerical reference and CI's backend, on CPU or GPU.

Math runs in fp32 (fp64 for fp64 inputs) on explicit score matrices, one block at a time.
GQA groups the q heads of each kv head in a view; k and v are never repeated in memory.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .interface import BandMask, VarlenRows
from .merge import merge_partials_

Span = tuple[int, int] | None  # rows [start, stop) of one varlen sequence; None: the whole dense block


def band_visibility(seqlen_q: int, seqlen_k: int, mask: BandMask, device: torch.device) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) matrix of the keys each query sees."""
    offset = torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if mask.lo is not None:
        visible &= offset >= mask.lo
    if mask.hi is not None:
        visible &= offset <= mask.hi
    return visible


def _segments(varlen: VarlenRows | None) -> list[tuple[Span, Span]]:
    """The dense sub-problems of a block: itself, or one per non-empty varlen sequence."""
    if varlen is None:
        return [(None, None)]

    def spans(cu_seqlens: torch.Tensor, seqused: torch.Tensor) -> list[tuple[int, int]]:
        return [(start, start + used) for start, used in zip(cu_seqlens[:-1].tolist(), seqused.tolist())]

    pairs = zip(spans(varlen.cu_seqlens_q, varlen.seqused_q), spans(varlen.cu_seqlens_k, varlen.seqused_k))
    return [(q, k) for q, k in pairs if q[1] > q[0] and k[1] > k[0]]


def _select(t: torch.Tensor, span: Span, seq_dim: int = -3) -> torch.Tensor:
    """A view of the rows of one sub-problem, with a batch dim (lse-like tensors: seq_dim=-1)."""
    return t if span is None else t.narrow(seq_dim, span[0], span[1] - span[0]).unsqueeze(0)


class _Scores:
    """Softmax inputs of one dense block, in math precision, grouped (b, h_kv, group, s, ...)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BandMask, softmax_scale: float):
        math = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.group = q.shape[2] // k.shape[2]
        self.q = rearrange(q.to(math), "b s (h g) d -> b h g s d", g=self.group)
        self.k = rearrange(k.to(math), "b s h d -> b h s d")
        self.v = rearrange(v.to(math), "b s h d -> b h s d")
        self.scale = softmax_scale
        visible = band_visibility(q.shape[1], k.shape[1], mask, q.device)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", self.q, self.k) * softmax_scale
        self.logits = scores.masked_fill(~visible, float("-inf"))

    def grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """(b, s, h, d) q-side rows to (b, h_kv, group, s, d) in math precision."""
        return rearrange(rows.to(self.q.dtype), "b s (h g) d -> b h g s d", g=self.group)

    def probabilities(self, lse: torch.Tensor) -> torch.Tensor:
        """exp(logits - lse), exactly 0 for masked keys and for rows with lse = -inf."""
        lse = rearrange(lse.to(self.q.dtype), "b (h g) s -> b h g s", g=self.group).unsqueeze(-1)
        return torch.where(lse == float("-inf"), 0.0, torch.exp(self.logits - lse))


class ReferenceBackend:
    """The kernel interface in plain PyTorch (see `AttentionBackend`)."""

    name = "reference"

    def forward_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out_acc: torch.Tensor,
        lse_acc: torch.Tensor,
        *,
        mask: BandMask,
        softmax_scale: float,
        accumulate: bool,
        varlen: VarlenRows | None = None,
    ) -> None:
        for q_span, k_span in _segments(varlen):
            block = _Scores(_select(q, q_span), _select(k, k_span), _select(v, k_span), mask, softmax_scale)
            lse = torch.logsumexp(block.logits, dim=-1)
            out = torch.einsum("bhgqk,bhkd->bqhgd", block.probabilities(rearrange(lse, "b h g s -> b (h g) s")), block.v)
            out = rearrange(out, "b s h g d -> b s (h g) d")
            lse = rearrange(lse, "b h g s -> b (h g) s")
            out_rows, lse_rows = _select(out_acc, q_span), _select(lse_acc, q_span, seq_dim=-1)
            if accumulate:
                merge_partials_(out_rows, lse_rows.transpose(-1, -2), out, lse.transpose(-1, -2))
            else:
                out_rows.copy_(out)
                lse_rows.copy_(lse)

    def backward_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        delta: torch.Tensor,
        dq_acc: torch.Tensor,
        dk_acc: torch.Tensor,
        dv_acc: torch.Tensor,
        *,
        mask: BandMask,
        softmax_scale: float,
        varlen: VarlenRows | None = None,
    ) -> None:
        del out  # delta already carries rowsum(dout * out)
        for q_span, k_span in _segments(varlen):
            block = _Scores(_select(q, q_span), _select(k, k_span), _select(v, k_span), mask, softmax_scale)
            probs = block.probabilities(_select(lse, q_span, seq_dim=-1))
            dout_g = block.grouped(_select(dout, q_span))
            delta_g = rearrange(_select(delta, q_span, seq_dim=-1).to(probs.dtype), "b (h g) s -> b h g s", g=block.group)
            dscores = probs * (torch.einsum("bhgqd,bhkd->bhgqk", dout_g, block.v) - delta_g.unsqueeze(-1))
            dq = torch.einsum("bhgqk,bhkd->bqhgd", dscores, block.k) * softmax_scale
            _select(dq_acc, q_span).add_(rearrange(dq, "b s h g d -> b s (h g) d"))
            _select(dk_acc, k_span).add_(torch.einsum("bhgqk,bhgqd->bkhd", dscores, block.q) * softmax_scale)
            _select(dv_acc, k_span).add_(torch.einsum("bhgqk,bhgqd->bkhd", probs, dout_g))
