"""Test oracle: cases, fresh random inputs, a naive attention reference and FlashAttention's error rule.

The reference is written independently of fa4_cp: explicit (S, S) masks, GQA by repeating heads,
autograd for the gradients. Run in fp64 it is the truth; run in the inputs' dtype it is the
"same-precision single-device reference" whose error sets the tolerance. One flow checks a ring's
results whatever ran it (gloo processes, a simulated ring, NCCL ranks): `assert_ring_matches`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import fa4_cp
from fa4_cp import Sharding
from fa4_cp.plan.mesh_sharding import MeshSharding

TENSORS = ("out", "lse", "dq", "dk", "dv")
SINK_TENSORS = (*TENSORS, "ds")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    causal: bool = True
    layout: str = "zigzag"
    heads: int = 4
    kv_heads: int = 4
    window_in_chunks: tuple[float, float] | None = None  # window (left, right) in chunk sizes
    documents: bool = False
    batch: int = 2
    head_dim: int = 16
    head_dim_v: int | None = None  # v's own head_dim (MLA: narrower than q's and k's); None: head_dim
    fixed_seq_len: int | None = None  # the same tokens whatever the ring size
    chunk: int | None = None  # dense chunk size whatever the ring size
    doc_mix: str = "mixed"  # packed documents: see doc_lengths
    softcap: float | None = None
    sinks: bool = False  # per-head sink logits, checked with their gradient ds
    ulysses: int = 1  # a 2-D mesh of ulysses x (W / ulysses) ring ranks

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def tensors(self) -> tuple[str, ...]:
        return SINK_TENSORS if self.sinks else TENSORS

    def chunk_size(self, world_size: int) -> int:
        if self.chunk is not None:
            return self.chunk
        return 8 if world_size <= 4 else 4 if world_size <= 16 else 2

    def window(self, world_size: int) -> tuple[int, int]:
        if self.window_in_chunks is None:
            return (-1, -1)
        chunk = self.chunk_size(world_size)
        return tuple(-1 if w < 0 else int(w * chunk) for w in self.window_in_chunks)

    def doc_lengths(self, world_size: int) -> list[int]:
        """mixed: odd lengths, documents shorter than 2W and a one-token document (all-padding
        chunks); short: all of a few tokens; huge: one document longer than a rank's share (the
        balanced layout splits it) among tiny ones; empty_and_single: 0- and 1-token documents;
        all_whole: one document per rank (the balanced layout keeps them all whole)."""
        two_w = 2 * world_size
        return {
            "mixed": [3 * two_w + 1, world_size, 1, two_w + 5, 7, 2 * two_w],
            "short": [1, 2, 3, 5, 8, 13, 4, 6, 2, 9, 11, 1, 7],
            "huge": [3, 300 + 4 * world_size, 1, 6, 0, 17],
            "empty_and_single": [0, 1, 0, two_w + 3, 1, 9, 0],
            "all_whole": [12] * world_size,
            "around_window": [1, 5, 6, 7, 1, 40 + 4 * world_size, 2, 6, 13, 1],  # around the windows (6 tokens at W <= 4): shorter, equal, longer, 1-token
        }[self.doc_mix]

    def seq_len(self, world_size: int) -> int:
        if self.fixed_seq_len is not None:
            return self.fixed_seq_len
        if self.documents:
            return sum(self.doc_lengths(world_size))
        chunks = 2 * world_size if self.layout == "zigzag" else world_size
        return chunks * self.chunk_size(world_size) * (2 if self.layout == "contiguous" else 1)

    def sharding(self, world_size: int):
        ring = world_size // self.ulysses
        if self.documents:
            sharding = Sharding.documents(self.doc_lengths(world_size), ring, self.layout, self.ulysses)
        else:
            sharding = Sharding.dense(self.seq_len(world_size), ring, self.layout)
        return sharding if self.ulysses == 1 else MeshSharding(sharding, self.ulysses)

    def cu_seqlens(self, world_size: int) -> torch.Tensor:
        lengths = torch.tensor([0, *self.doc_lengths(world_size)])
        return lengths.cumsum(0).to(torch.int32)


CASES = [
    Case("causal_zigzag"),
    Case("full_zigzag", causal=False),
    Case("full_contiguous", causal=False, layout="contiguous"),
    Case("window_causal", window_in_chunks=(1.5, 0)),
    Case("window_both_sides", causal=False, layout="contiguous", window_in_chunks=(0.75, 1.25)),
    Case("gqa_one_kv_head", kv_heads=1),
    Case("gqa_half_kv_heads", kv_heads=2),
    Case("varlen_causal", documents=True),
    Case("varlen_full_gqa", causal=False, documents=True, kv_heads=2),
    Case("varlen_causal_contiguous", layout="contiguous", documents=True),
    Case("balanced_causal", layout="balanced", documents=True),
    Case("balanced_huge_gqa", layout="balanced", documents=True, doc_mix="huge", kv_heads=2),
    Case("balanced_huge_full", causal=False, layout="balanced", documents=True, doc_mix="huge"),  # both streams carry both chunks
    Case("balanced_short", layout="balanced", documents=True, doc_mix="short"),
    Case("balanced_empty_and_single", layout="balanced", documents=True, doc_mix="empty_and_single"),
    Case("balanced_all_whole_full", causal=False, layout="balanced", documents=True, doc_mix="all_whole"),
    Case("balanced_window", layout="balanced", documents=True, doc_mix="around_window", window_in_chunks=(0.75, 0)),
    Case("varlen_window_zigzag_gqa", documents=True, doc_mix="around_window", window_in_chunks=(0.75, 0), kv_heads=2),
    Case("varlen_window_both_sides_contiguous", causal=False, layout="contiguous", documents=True, doc_mix="around_window", window_in_chunks=(0.75, 0.5)),
    Case("sinks_causal_gqa", kv_heads=2, sinks=True),
    Case("sinks_window", window_in_chunks=(1.5, 0), sinks=True),
    Case("sinks_balanced_window", layout="balanced", documents=True, doc_mix="around_window", window_in_chunks=(0.75, 0), sinks=True),
    Case("softcap_causal", softcap=0.5),
    Case("softcap_sinks_balanced_gqa", layout="balanced", documents=True, kv_heads=2, softcap=0.5, sinks=True),
    Case("mla_causal_gqa", kv_heads=2, head_dim=24, head_dim_v=16),  # DeepSeek-V3's 192 / 128, scaled down
    Case("mla_balanced_window_sinks", layout="balanced", documents=True, doc_mix="around_window", window_in_chunks=(0.75, 0), head_dim=24, head_dim_v=16, sinks=True),
]
CASES_BY_NAME = {case.name: case for case in CASES}


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    dlse: torch.Tensor | None  # None: the loss reads out alone, so the backward gets no lse gradient
    cu_seqlens: torch.Tensor | None = None
    sinks: torch.Tensor | None = None


def make_inputs(case: Case, world_size: int, dtype: torch.dtype, seed: int) -> Inputs:
    """Fresh random inputs, full (unsharded); varlen tensors have no batch dim."""
    generator = torch.Generator().manual_seed(seed)
    seq = case.seq_len(world_size)
    lead = (seq,) if case.documents else (case.batch, seq)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    q = randn(*lead, case.heads, case.head_dim)
    k = randn(*lead, case.kv_heads, case.head_dim)
    v = randn(*lead, case.kv_heads, case.v_dim)
    dout = randn(*lead, case.heads, case.v_dim)
    dlse = randn(*lead[:-1], case.heads, seq).float() * 0.1
    sinks = randn(case.heads) if case.sinks else None
    return Inputs(q, k, v, dout, dlse, case.cu_seqlens(world_size) if case.documents else None, sinks)


def on_cuda(inputs: Inputs) -> Inputs:
    return dataclasses.replace(inputs, **{f.name: getattr(inputs, f.name).cuda() for f in dataclasses.fields(inputs) if getattr(inputs, f.name) is not None})


def band_matrix(seqlen_q: int, seqlen_k: int, lo: int | None, hi: int | None, device="cpu") -> torch.Tensor:
    """(seqlen_q, seqlen_k): key j visible to query i iff lo <= j - i <= hi (None: unbounded)."""
    offset = torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if lo is not None:
        visible &= offset >= lo
    if hi is not None:
        visible &= offset <= hi
    return visible


def visibility(case: Case, world_size: int) -> torch.Tensor:
    """(S, S) boolean mask of the full sequence: documents, causality, window."""
    seq = case.seq_len(world_size)
    if case.documents:
        lengths = case.doc_lengths(world_size)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        starts = torch.tensor([0, *lengths]).cumsum(0)[doc]
        position = torch.arange(seq) - starts
        same_doc = doc[:, None] == doc[None, :]
    else:
        position = torch.arange(seq)
        same_doc = torch.ones(seq, seq, dtype=torch.bool)
    offset = position[None, :] - position[:, None]
    left, right = case.window(world_size)
    visible = same_doc.clone()
    if case.causal:
        visible &= offset <= 0
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    return visible


def naive_attention(q, k, v, visible: torch.Tensor, scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None):
    """(out, lse) of explicit masked softmax attention; q (..., S, H, D); lse (..., H, S). A softcap
    caps the scaled scores with tanh; sinks (H,) are one more key per head, of value zero."""
    group = q.shape[-2] // k.shape[-2]
    k = k.repeat_interleave(group, dim=-2)
    v = v.repeat_interleave(group, dim=-2)
    scores = torch.einsum("...qhd,...khd->...hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink_column = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("...hqk,...khd->...qhd", probs, v), lse


def reference_results(case: Case, world_size: int, inputs: Inputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """out, lse, dq, dk, dv of the full sequence on one device, computed in `dtype`."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    sinks = None if inputs.sinks is None else inputs.sinks.detach().to(dtype).requires_grad_()
    out, lse = naive_attention(q, k, v, visibility(case, world_size), case.head_dim**-0.5, case.softcap, sinks)
    loss = (out * inputs.dout.to(dtype)).sum() + lse_loss(lse, inputs.dlse)
    loss.backward()
    results = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if sinks is not None:
        results["ds"] = sinks.grad
    return results


def lse_loss(lse: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor | float:
    """The loss's lse term, over finite values (rows that see no key have lse -inf)."""
    return 0.0 if dlse is None else (lse.where(torch.isfinite(lse), 0) * dlse.to(lse.dtype)).sum()


def ring_results_for_rank(case: Case, world_size: int, inputs: Inputs, group, rank: int, **kwargs) -> dict[str, torch.Tensor]:
    """This rank's local out, lse, dq, dk, dv from fa4_cp's ring, with autograd."""
    sharding = case.sharding(world_size)
    seq_dim = 0 if case.documents else 1
    q, k, v, dout = (sharding.shard(t, rank, seq_dim) for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    dlse = None if inputs.dlse is None else sharding.shard(inputs.dlse, rank, seq_dim=-1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sinks = None if inputs.sinks is None else inputs.sinks.clone().requires_grad_()
    options = dict(
        group=group, causal=case.causal, window_size=case.window(world_size), layout=case.layout, return_lse=True,
        softcap=case.softcap, sinks=sinks, **kwargs,
    )
    if case.documents:
        out, lse = fa4_cp.ring_attention_varlen(q, k, v, inputs.cu_seqlens, **options)
    else:
        out, lse = fa4_cp.ring_attention(q, k, v, **options)
    loss = (out * dout).sum() + lse_loss(lse, dlse)
    loss.backward()
    results = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if sinks is not None:
        results["ds"] = sinks.grad
    return results


def unshard_results(case: Case, world_size: int, per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full-sequence results; ds, a replicated weight's gradient, is the sum of the ranks'."""
    sharding = case.sharding(world_size)
    seq_dim = 0 if case.documents else 1
    results = {
        name: sharding.unshard([r[name].cpu() for r in per_rank], seq_dim=-1 if name == "lse" else seq_dim)
        for name in TENSORS
    }
    if case.sinks:
        results["ds"] = torch.stack([r["ds"].cpu().double() for r in per_rank]).sum(0)
    return results


def padding_slots(case: Case, world_size: int, rank: int) -> torch.Tensor:
    return case.sharding(world_size).token_index(rank) < 0


def max_error(result: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute error; NaN anywhere or a mismatched -inf makes it infinite."""
    result, truth = result.double().cpu(), truth.double().cpu()
    if torch.isnan(result).any():
        return math.inf
    empty = torch.isinf(truth)
    if not torch.equal(torch.isinf(result), empty) or not torch.equal(result[empty], truth[empty]):
        return math.inf
    return (result[~empty] - truth[~empty]).abs().max().item() if (~empty).any() else 0.0


def _largest(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def errors_against(truth: dict, results: dict) -> dict[str, float]:
    return {name: max_error(results[name], truth[name]) for name in truth}


ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-12}
# fp32's atol is relative to the tensor's largest |value| where that exceeds 1: there the 2x rule
# alone holds fp32 to a few ulps of its largest values, and a reference that happens to round
# luckily (one dk element of 1.2, 14 ulps off in a block sum, failed on one CPU and passed on another)
# makes it flaky. The 16-bit rules stay absolute.
RELATIVE_ATOL = {torch.float32}


def assert_flash_rule(
    errors: dict[str, float], baseline: dict[str, float], dtype: torch.dtype, label: str, scale: dict[str, float] | None = None,
) -> None:
    """FlashAttention's rule: error <= 2 x (same-precision reference's error) + a small atol;
    `scale`: each tensor's largest |truth|, for the dtypes whose atol is relative."""
    for name in errors:
        atol = ATOL[dtype] * (max(1.0, scale[name]) if scale is not None and dtype in RELATIVE_ATOL else 1.0)
        bound = 2 * baseline[name] + atol
        assert errors[name] <= bound, f"{label}: {name} error {errors[name]:.3e} > {bound:.3e} (reference {baseline[name]:.3e})"


def assert_clean_padding(case: Case, world_size: int, per_rank: list[dict[str, torch.Tensor]]) -> None:
    """Padding slots hold exactly 0 (out, dq, dk, dv) and lse -inf; nothing is NaN."""
    for rank, local in enumerate(per_rank):
        padding = padding_slots(case, world_size, rank).to(local["out"].device)
        for name in ("out", "dq", "dk", "dv"):
            assert not local[name].isnan().any(), f"rank {rank} {name} has NaN"
            assert (local[name][..., padding, :, :] == 0).all(), f"rank {rank}: {name} is not exactly 0 on padding"
        assert (local["lse"][..., padding] == float("-inf")).all(), f"rank {rank}: lse of padding is not -inf"


def assert_ring_matches(case: Case, world_size: int, inputs: Inputs, dtype: torch.dtype, per_rank: list[dict], baseline: dict | None = None) -> dict:
    """Every rank's local results, unsharded, against fp64 by FlashAttention's rule; the baseline
    is the same-precision reference unless given (e.g. upstream FA4's errors). Returns the errors."""
    truth = reference_results(case, world_size, inputs, torch.float64)
    if baseline is None:
        baseline = errors_against(truth, reference_results(case, world_size, inputs, dtype))
    errors = errors_against(truth, unshard_results(case, world_size, per_rank))
    scale = {name: _largest(truth[name]) for name in errors}
    assert_flash_rule(errors, baseline, dtype, f"{case.name} {dtype} W={world_size}", scale)
    assert_clean_padding(case, world_size, per_rank)
    return errors


@dataclass(frozen=True)
class PrefixEntries:
    """The 2g zigzag chunks of one document in one varlen launch, each against its own prefix of
    the document's K/V: q holds the chunks in zigzag order (rank 0's two, then rank 1's, ...),
    K/V the document in order, and every entry's kv rows start at row 0 (shared rows)."""

    order: torch.Tensor  # q's rows as rows of the document
    cu_seqlens_q: list[int]
    cu_seqlens_k: list[int]
    seqused_q: list[int]
    seqused_k: list[int]

    @staticmethod
    def make(length: int, ranks: int) -> PrefixEntries:
        bounds = [round(i * length / (2 * ranks)) for i in range(2 * ranks + 1)]
        chunks = [c for rank in range(ranks) for c in (rank, 2 * ranks - 1 - rank)]
        order = torch.cat([torch.arange(bounds[c], bounds[c + 1]) for c in chunks])
        used_q = [bounds[c + 1] - bounds[c] for c in chunks]
        starts = [sum(used_q[:i]) for i in range(len(chunks))]
        return PrefixEntries(order, [*starts, length], [0] * (len(chunks) + 1), used_q, [bounds[c + 1] for c in chunks])

    def varlen(self, device, **kwargs):
        """The launch's VarlenRows: masks aligned at each entry's end, the shared rows' total declared."""
        from fa4_cp.kernels import VarlenRows

        rows = (self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_q, self.seqused_k)
        tensors = (torch.tensor(x, dtype=torch.int32, device=device) for x in rows)
        return VarlenRows(*tensors, aligned_at_end=True, shared_kv_rows=sum(self.seqused_k), **kwargs)
