"""The one kernel interface every ring step uses: attention with log-sum-exp (LSE) partials.

Tensor layouts follow FlashAttention-4:
- dense:  q, out (b, s, h, d); k, v (b, s, h_kv, d); lse (b, h, s)
- varlen: q, out (total, h, d); k, v (total, h_kv, d); lse (h, total), with int32 cu_seqlens/seqused

A backend knows nothing of ranks: it sees one (q rows, kv rows, mask) block at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class BandMask:
    """Which keys each query of a block sees.

    Key j is visible to query i (indices local to the block, per sequence for varlen) iff
    ``lo <= j - i <= hi``; ``None`` leaves that side unbounded. ``BandMask()`` is no mask,
    ``BandMask(hi=0)`` is causal, ``BandMask(hi=-o)`` is causal with the diagonal moved o keys
    left, and ``BandMask(lo=-left, hi=right)`` is a sliding window.
    """

    lo: int | None = None
    hi: int | None = None

    @property
    def is_full(self) -> bool:
        return self.lo is None and self.hi is None

    @staticmethod
    def from_flags(causal: bool, window_size: tuple[int, int]) -> BandMask:
        """The mask of FlashAttention's (causal, window_size) flags; -1 means unbounded."""
        left, right = window_size
        hi = None if right < 0 else right
        if causal:
            hi = 0 if hi is None else min(hi, 0)
        return BandMask(lo=None if left < 0 else -left, hi=hi)


@dataclass(frozen=True, eq=False)  # a bundle of device tensors: identity is equality
class VarlenRows:
    """Per-sequence row selection of a varlen block, as FlashAttention-4 takes it.

    Sequence n of the block is q rows ``[cu_seqlens_q[n], cu_seqlens_q[n] + seqused_q[n])`` against
    kv rows ``[cu_seqlens_k[n], cu_seqlens_k[n] + seqused_k[n])``. All four are int32 on the
    device of q; cu_seqlens_* have one more entry than there are sequences.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqused_q: torch.Tensor
    seqused_k: torch.Tensor
    seqused_q_all: torch.Tensor | None = None
    """Blocks that share this cu_seqlens_q tensor select, of each sequence, either no row or the
    first `seqused_q_all[n]`: a backend may then keep per-sequence state (a dq accumulator) once
    for all of them. None: nothing is promised beyond this block."""
    kv_shift: int = 0
    """seqused_k[n] - seqused_q[n], the same for every sequence the block computes when its mask
    is not full (planners split blocks to make it so): the block's mask is top-left in every
    sequence, and a backend whose masks align bottom-right (FA4) moves its window by this."""
    computed_sequences: int | None = None
    """Every sequence the block computes is among its first `computed_sequences`, so a launch may
    list those alone, and its q rows may end where the next sequence starts: the planner gives
    such a block those rows as its q side. A varlen launch's grid grows with both. None: no
    shorter list."""
    aligned_at_end: bool = False
    """The mask aligns every sequence at its end (its last q row against its last kv row, as FA4
    aligns it), whatever seqused_k[n] - seqused_q[n]: so one launch takes sequences of different
    shifts, such as the q chunks of one document each against its own KV prefix. `kv_shift` is
    then unused."""
    shared_kv_rows: int | None = None
    """Where the sequences' kv rows overlap (several entries against one KV buffer): the kv rows
    the computed sequences select, summed, which may exceed k's rows; k and v then need
    `KV_TILE_OVERHANG` finite rows of their storage past their last row. None: the sequences'
    kv rows are disjoint."""

    @functools.cached_property
    def computed_prefix(self) -> VarlenRows:
        """This block listing its `computed_sequences` alone (views of its tensors at the same
        offsets; itself where there is no shorter list), made once per block."""
        if self.computed_sequences is None:
            return self
        n = self.computed_sequences
        return VarlenRows(
            self.cu_seqlens_q[: n + 1], self.cu_seqlens_k[: n + 1], self.seqused_q[:n], self.seqused_k[:n], kv_shift=self.kv_shift,
            aligned_at_end=self.aligned_at_end, shared_kv_rows=self.shared_kv_rows,
        )


def check_fixed_order(varlen: VarlenRows | None, deterministic: bool) -> None:
    """ValueError for a deterministic backward step over sequences whose kv rows overlap: their
    dK/dV meet at a row in no fixed order."""
    if deterministic and varlen is not None and varlen.shared_kv_rows is not None:
        raise ValueError("deterministic: varlen sequences whose kv rows overlap (VarlenRows.shared_kv_rows) sum dK/dV in no fixed order")


@dataclass(frozen=True, eq=False)  # device tensors: identity is equality
class IndexedSums:
    """Partial dK/dV sums over some of k's rows, in an order of their own: row i of `sums`
    (2, ..., n, h_kv, width) belongs to k's row `rows[i]` (int64, n), and `positions[r]` (int32,
    one per k row) is i for those rows, -1 or at least n for the others."""

    sums: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor


KV_TILE_OVERHANG = 256
"""Rows past a block's last K/V row that a kernel may load: it loads whole tiles of K and V and
masks the scores past the block, and FA4's tiles hold at most 144 K/V rows. A masked score's zero
times a NaN is NaN, so those rows must be finite."""


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """out, dq, dk and dv accumulate one step wider than the inputs: fp32 for 16-bit inputs, fp64
    for fp32/fp64 (so that the reference's error does not grow with the ring either)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


LSE_ACCUMULATOR_DTYPE = torch.float64
"""The running LSE is fp64 whatever the inputs: it is one value per row, so the width costs
nothing, while an fp32 LSE is rounded at every merge and its error grows as sqrt(merges) ulps
(4x at 72 ranks). The LSE a ring call returns, and its backward reads, is rounded once
(`returned_lse_dtype`)."""


def returned_lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE a ring call returns and saves for its backward, rounded once from the running LSE:
    fp32 beside 16-bit inputs (what FA4's kernels write and read, so a ring of one converts
    nothing), fp64 beside fp32/fp64."""
    return accumulator_dtype(dtype)


class ForwardPass(Protocol):
    """One ring call's forward on one rank: built once, then one `step` per block call.
    Everything fixed for the call (dtype, head sizes, GQA ratio, architecture, scale) is bound
    when the pass is made, so a step only picks its kernel and launches it."""

    writes_rounded_varlen: bool
    """Whether `write_rounded` takes varlen blocks (the balanced layout's kept documents);
    else only a dense sole block writes rounded."""

    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out_acc: torch.Tensor,
        lse_acc: torch.Tensor,
        *,
        mask: BandMask,
        accumulate: bool,
        varlen: VarlenRows | None = None,
        write_rounded: bool = False,
    ) -> None:
        """Merge softmax(q k^T) v of this block into (out_acc, lse_acc) in place.

        With ``accumulate=False`` the block's result overwrites the accumulators (first block,
        covering every row); rows not selected by ``varlen`` are never touched. With
        ``accumulate=True``, a selected row whose lse_acc is -inf takes the block's result without
        reading its out_acc (which may be unset), out 0 where the block shows it no key. With
        ``write_rounded`` (and not ``accumulate``), a block that is the only one of every row it
        selects writes out in q's dtype and lse in fp32 (fp64 beside fp32 or fp64 inputs):
        (out_acc, lse_acc) are then of those dtypes.
        """
        ...


class BackwardPass(Protocol):
    """One ring call's backward on one rank, from its final (out, lse): built once, then one
    `step` per block call. dq accumulates inside the pass, in whatever layout the backend's
    kernel accumulates in, and leaves it once through `dq`. dK accumulates in units of
    `dk_scale`: whoever reads a finished sum multiplies it by `dk_scale` once."""

    dk_scale: float

    def step(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        dk_acc: torch.Tensor,
        dv_acc: torch.Tensor,
        *,
        q_rows: slice,
        mask: BandMask,
        varlen: VarlenRows | None = None,
        write_first: bool = False,
        write_rounded: bool = False,
    ) -> None:
        """Add the block's dq to the pass and its dk / dk_scale, dv to (dk_acc, dv_acc), which are
        in `accumulator_dtype`, shaped like k, v, with unit stride along head_dim. The block's q
        rows are ``q_rows`` of the pass's q (dense), or the rows ``varlen`` selects (varlen, with
        ``q_rows`` everything). Varlen sequences whose kv rows overlap (`VarlenRows.shared_kv_rows`)
        sum their dK/dV; a deterministic pass refuses them (they meet at a row in no fixed order). With ``write_first``
        (only where `can_write_first`), a dense block overwrites every row of (dk_acc, dv_acc)
        instead, so that they need not start zeroed. With ``write_rounded`` (only where
        `can_write_rounded`), a dense block that is the only one to add to any row of K and V
        writes them finished: (dk_acc, dv_acc) are then tensors of k's and v's dtype, and get dK
        (in true units) and dV."""
        ...

    def can_write_first(self, k: torch.Tensor) -> bool:
        """Whether `step` takes ``write_first`` for blocks against kv heads like `k`'s."""
        ...

    def can_write_rounded(self, k: torch.Tensor) -> bool:
        """Whether `step` takes ``write_rounded`` for blocks against kv heads like `k`'s."""
        ...

    def dq(self) -> torch.Tensor:
        """The accumulated dq, shaped like q: in `accumulator_dtype`, or in q's dtype when the
        backend rounds it once itself."""
        ...

    def finish_dkv(
        self, local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
        indexed: tuple[IndexedSums, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's dK and dV, new tensors of k's and v's shapes and dtype rounded once:
        ``local`` (2, ..., s, h_kv, width), if any, plus each (2, ..., rows, h_kv, width) sum of
        ``travelled`` over k's first rows, plus each of ``indexed`` at its rows, dK multiplied by
        `dk_scale`; width is the wider of k's and v's head_dims, dK and dV the first columns of
        their halves. All are in `accumulator_dtype`; the pass may overwrite them."""
        ...


class AttentionBackend(Protocol):
    """Attention with LSE partials over one block pair.

    Accumulators: out_acc in `accumulator_dtype`, lse_acc in LSE_ACCUMULATOR_DTYPE (fp64); dk, dv
    in `accumulator_dtype`. Rows that see no key have lse = -inf and out = 0. The caller owns
    out_acc, lse_acc, dk_acc and dv_acc; the backward pass owns dq.
    """

    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, softmax_scale: float, softcap: float | None = None) -> ForwardPass:
        """Start the forward of one ring call whose blocks take rows of `q` and of `k`-shaped KV.
        With `softcap`, scores are capped as softcap * tanh(score / softcap) (score = scale q.k)."""
        ...

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
    ) -> BackwardPass:
        """Start the backward of one ring call. ``out`` (q's dtype) and ``lse`` are final;
        ``dlse`` is the upstream lse gradient, if any. Row statistics such as
        delta = rowsum(dout * out) - dlse are computed here, once per call, not per step.
        With ``deterministic``, every gradient is summed in a fixed order: bitwise the same on
        every run with the same inputs."""
        ...
