"""PyTorch reference backend: the numerical reference and CI's backend, on CPU or GPU.

Math runs in fp32 (fp64 for fp64 inputs) on explicit score matrices, one block at a time; a
varlen block is one masked problem over the selected rows of all its sequences. GQA stacks the
q heads of each kv head along the rows; k and v are never repeated in memory.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from einops import rearrange

from .dkv_sum import TorchFinishedGradients
from .interface import BandMask, VarlenRows, accumulator_dtype, check_fixed_order
from .merge import merge_partials_


def band_visibility(seqlen_q: int, seqlen_k: int, mask: BandMask, device: torch.device) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) matrix of the keys each query sees."""
    return _band(torch.arange(seqlen_q, device=device), torch.arange(seqlen_k, device=device), mask)


def _band(q_positions: torch.Tensor, k_positions: torch.Tensor, mask: BandMask) -> torch.Tensor:
    offset = k_positions[None, :] - q_positions[:, None]
    visible = torch.ones(offset.shape, dtype=torch.bool, device=offset.device)
    if mask.lo is not None:
        visible &= offset >= mask.lo
    if mask.hi is not None:
        visible &= offset <= mask.hi
    return visible


class _Rows:
    """The rows of a block as one dense problem: a dense block as it is (no indices), or the
    selected rows of every varlen sequence gathered into a batch of one, masked to their own
    sequence."""

    def __init__(self, q_index: torch.Tensor | None, k_index: torch.Tensor | None, visible: torch.Tensor):
        self.q_index, self.k_index, self.visible = q_index, k_index, visible

    def q(self, t: torch.Tensor, seq_dim: int = -3) -> torch.Tensor:
        return _take(t, self.q_index, seq_dim)

    def k(self, t: torch.Tensor) -> torch.Tensor:
        return _take(t, self.k_index, -3)

    def write_q(self, acc: torch.Tensor, value: torch.Tensor, seq_dim: int = -3) -> None:
        if self.q_index is None:
            if value is not acc:
                acc.copy_(value)
        else:
            acc.index_copy_(seq_dim, self.q_index, value.squeeze(0).to(acc.dtype))

    def add_q(self, acc: torch.Tensor, value: torch.Tensor, alpha: float = 1.0) -> None:
        _add(acc, self.q_index, value, alpha)

    def add_k(self, acc: torch.Tensor, value: torch.Tensor, alpha: float = 1.0) -> None:
        _add(acc, self.k_index, value, alpha)


def _take(t: torch.Tensor, index: torch.Tensor | None, seq_dim: int) -> torch.Tensor:
    return t if index is None else t.index_select(seq_dim, index).unsqueeze(0)


def _add(acc: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor, alpha: float) -> None:
    if index is None:
        acc.add_(value, alpha=alpha)
    else:
        acc.index_add_(-3, index, value.squeeze(0).to(acc.dtype), alpha=alpha)


def selected_rows(cu_seqlens: torch.Tensor, seqused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row index, sequence id and position in the sequence of every selected varlen row."""
    starts = cu_seqlens[:-1].long()
    used = seqused.long()
    sequence = torch.repeat_interleave(torch.arange(len(used), device=used.device), used)
    position = torch.arange(len(sequence), device=used.device) - (used.cumsum(0) - used)[sequence]
    return starts[sequence] + position, sequence, position


_varlen_cache: weakref.WeakKeyDictionary[VarlenRows, dict[BandMask, _Rows]] = weakref.WeakKeyDictionary()
_varlen_cache_lock = threading.Lock()


@functools.lru_cache(maxsize=64)  # block shapes x masks of the calls in use
def _cached_band(seqlen_q: int, seqlen_k: int, mask: BandMask, device: torch.device) -> torch.Tensor:
    return band_visibility(seqlen_q, seqlen_k, mask, device)


def _rows(q: torch.Tensor, k: torch.Tensor, mask: BandMask, varlen: VarlenRows | None) -> _Rows:
    """The block's rows, built once per (varlen rows, mask): a ring reuses both at every step.
    A varlen block lists its computed sequences alone, as FA4 launches it (VarlenRows.computed_prefix)."""
    if varlen is None:
        return _Rows(None, None, _cached_band(q.shape[1], k.shape[1], mask, q.device))
    varlen = varlen.computed_prefix
    with _varlen_cache_lock:
        per_mask = _varlen_cache.setdefault(varlen, {})
        if mask not in per_mask:
            q_index, q_doc, q_pos = selected_rows(varlen.cu_seqlens_q, varlen.seqused_q)
            k_index, k_doc, k_pos = selected_rows(varlen.cu_seqlens_k, varlen.seqused_k)
            if varlen.aligned_at_end:  # each sequence's last kv row at its last q row's position
                k_pos = k_pos - (varlen.seqused_k.long() - varlen.seqused_q.long())[k_doc]
            per_mask[mask] = _Rows(q_index, k_index, (q_doc[:, None] == k_doc[None, :]) & _band(q_pos, k_pos, mask))
        return per_mask[mask]


class _Scores:
    """Masked logits of one dense block in math precision; the q heads of each kv head are
    stacked along the rows: (b, h_kv, group * s_q, s_k). With a softcap, logits are
    softcap * tanh(scale q.k / softcap), and `capped_slope` their derivative's factor."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, softmax_scale: float, softcap: float | None = None):
        self.math = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.group = q.shape[2] // k.shape[2]
        self.q = self.grouped(q)
        self.k = rearrange(k.to(self.math), "b s h d -> b h s d")
        self.v = rearrange(v.to(self.math), "b s h d -> b h s d")
        hidden = ~visible.repeat(self.group, 1)
        logits = self.q @ self.k.transpose(-1, -2) * softmax_scale
        self.capped_slope = None
        if softcap is not None:
            tanh = torch.tanh(logits / softcap)
            logits, self.capped_slope = softcap * tanh, 1 - tanh * tanh
        self.logits = logits.masked_fill_(hidden, float("-inf"))

    def grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """(b, s, h, d) q-side rows to (b, h_kv, group * s, d) in math precision."""
        return rearrange(rows.to(self.math), "b s (h g) d -> b h (g s) d", g=self.group)

    def grouped_rows(self, lse_like: torch.Tensor) -> torch.Tensor:
        """(b, h, s) per-row values to (b, h_kv, group * s, 1)."""
        return rearrange(lse_like.to(self.math), "b (h g) s -> b h (g s) 1", g=self.group)

    def ungrouped(self, out: torch.Tensor) -> torch.Tensor:
        return rearrange(out, "b h (g s) d -> b s (h g) d", g=self.group)

    def softmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's probabilities, and its lse as (b, h, s)."""
        lse = torch.logsumexp(self.logits, dim=-1, keepdim=True)
        return self._exp(lse), rearrange(lse, "b h (g s) 1 -> b (h g) s", g=self.group)

    def probabilities(self, lse: torch.Tensor) -> torch.Tensor:
        """exp(logits - lse) for a given (b, h, s) lse."""
        return self._exp(self.grouped_rows(lse))

    def _exp(self, lse: torch.Tensor) -> torch.Tensor:
        """exp(logits - lse), exactly 0 for masked keys and for rows with lse = -inf."""
        return torch.where(lse == float("-inf"), 0.0, torch.exp(self.logits - lse))


class ReferenceBackend:
    """The kernel interface in plain PyTorch (see `AttentionBackend`)."""

    name = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, softmax_scale: float, softcap: float | None = None) -> ReferenceForwardPass:
        return ReferenceForwardPass(softmax_scale, softcap)

    def backward(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        dlse: torch.Tensor | None,
        *,
        softmax_scale: float,
        softcap: float | None = None,
        deterministic: bool = False,
    ) -> ReferenceBackwardPass:
        # Deterministic as it is: one thread's sums on CPU; on GPU, a block's index_add selects
        # each row once (overlapping varlen kv rows excepted, which a deterministic pass refuses).
        return ReferenceBackwardPass(q, out, lse, dout, dlse, softmax_scale, softcap, deterministic)


class ReferenceForwardPass:
    writes_rounded_varlen = True

    def __init__(self, softmax_scale: float, softcap: float | None = None):
        self.softmax_scale, self.softcap = softmax_scale, softcap

    def step(
        self, q, k, v, out_acc, lse_acc, *, mask: BandMask, accumulate: bool, varlen: VarlenRows | None = None,
        write_rounded: bool = False,
    ) -> None:
        if write_rounded and accumulate:
            raise ValueError("write_rounded: a block that writes its rows, not one that accumulates")
        rows = _rows(q, k, mask, varlen)  # written rows take the accumulators' dtypes (q's and fp32 with write_rounded)
        block = _Scores(rows.q(q), rows.k(k), rows.k(v), rows.visible, self.softmax_scale, self.softcap)
        probs, lse = block.softmax()
        out = block.ungrouped(probs @ block.v)
        if accumulate:
            out_rows, lse_rows = rows.q(out_acc), rows.q(lse_acc, seq_dim=-1)
            merge_partials_(out_rows, lse_rows.transpose(-1, -2), out, lse.transpose(-1, -2))
            out, lse = out_rows, lse_rows
        rows.write_q(out_acc, out)
        rows.write_q(lse_acc, lse, seq_dim=-1)


class ReferenceBackwardPass(TorchFinishedGradients):
    """Backward of one ring call (see `BackwardPass`); dq accumulates in q's layout."""

    def __init__(self, q, out, lse, dout, dlse, softmax_scale: float, softcap: float | None = None, deterministic: bool = False):
        self.deterministic = deterministic
        math = accumulator_dtype(q.dtype)
        # dS = P * (dP - delta) + P * dlse: an lse gradient folds into delta.
        delta = rearrange((dout.to(math) * out.to(math)).sum(-1), "... s h -> ... h s")
        self.delta = delta if dlse is None else delta - dlse
        self.q, self.lse, self.dout, self.softmax_scale, self.softcap = q, lse, dout, softmax_scale, softcap
        self.dq_acc = torch.zeros(q.shape, dtype=math, device=q.device)

    def can_write_rounded(self, k: torch.Tensor) -> bool:
        return True

    def step(
        self, k, v, dk_acc, dv_acc, *, q_rows: slice, mask: BandMask, varlen: VarlenRows | None = None, write_first: bool = False,
        write_rounded: bool = False,
    ) -> None:
        if (write_first or write_rounded) and varlen is not None:
            raise ValueError("write_first, write_rounded: dense blocks only")
        check_fixed_order(varlen, self.deterministic)
        if write_rounded:  # sums in the accumulator dtype, rounded once into the caller's tensors
            finished = dk_acc, dv_acc
            dk_acc, dv_acc = (torch.zeros(t.shape, dtype=accumulator_dtype(t.dtype), device=t.device) for t in finished)
        elif write_first:
            dk_acc.zero_()
            dv_acc.zero_()
        q, dout = self.q[..., q_rows, :, :], self.dout[..., q_rows, :, :]
        lse, delta = self.lse[..., q_rows], self.delta[..., q_rows]
        rows = _rows(q, k, mask, varlen)
        block = _Scores(rows.q(q), rows.k(k), rows.k(v), rows.visible, self.softmax_scale, self.softcap)
        probs = block.probabilities(rows.q(lse, seq_dim=-1))
        dout_g = block.grouped(rows.q(dout))
        dscores = probs * (dout_g @ block.v.transpose(-1, -2) - block.grouped_rows(rows.q(delta, seq_dim=-1)))
        if block.capped_slope is not None:  # through the cap, back to scale * q.k
            dscores = dscores * block.capped_slope
        rows.add_q(self.dq_acc[..., q_rows, :, :], block.ungrouped(dscores @ block.k), alpha=self.softmax_scale)
        rows.add_k(dk_acc, rearrange(dscores.transpose(-1, -2) @ block.q, "b h s d -> b s h d"), alpha=self.softmax_scale)
        rows.add_k(dv_acc, rearrange(probs.transpose(-1, -2) @ dout_g, "b h s d -> b s h d"))
        if write_rounded:
            for target, total in zip(finished, (dk_acc, dv_acc)):
                target.copy_(total)
