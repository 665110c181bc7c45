"""The ring loop, forward and backward: one loop for every layout, mask and transport.

Everything fixed for the call is decided before the loop: the rank's plan (steps, blocks, rows,
first write), the backend's pass, the tensors' views per side. The loop only posts hops and
launches blocks.

Forward: KV travels (travelling.py), in one or more streams; each step merges its blocks into
fp32 (out, lse) accumulators. Backward: KV travels ahead as in the forward; the kernels add dK/dV
into partial sums that follow two steps behind, so a step launches its kernels and nothing else.
On GPU, hops run on the comm stream (comm/streams.py), so the loop never blocks the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.transport import Transport
from ..kernels.dkv_sum import finished_dkv, summed_dkv
from ..kernels.interface import LSE_ACCUMULATOR_DTYPE, AttentionBackend, accumulator_dtype, returned_lse_dtype
from ..plan.rows import RankPlan
from .travelling import TravellingDKV, TravellingKV, pair_shape, pair_views


@dataclass(frozen=True)
class Ring:
    """Everything a ring call needs besides its tensors."""

    plan: RankPlan
    transport: Transport
    backend: AttentionBackend
    softmax_scale: float
    softcap: float | None = None
    deterministic: bool = False
    """Gradients summed in a fixed order (the backend's kernels; the ring's order is fixed)."""

    def end_of_call(self) -> None:
        if self.transport.watchdog is not None:
            self.transport.watchdog.end_of_call()


def _lse_shape(q: torch.Tensor) -> tuple[int, ...]:
    """(b, h, s) for dense q (b, s, h, d); (h, total) for varlen q (total, h, d)."""
    return (*q.shape[:-3], q.shape[-2], q.shape[-3])


def _rows(t: torch.Tensor, rows: slice | None, seq_dim: int) -> torch.Tensor:
    if rows is None:
        return t
    return t[..., rows, :, :] if seq_dim == -3 else t[..., rows]


def ring_forward(
    ring: Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rounded: bool = False, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local q against every rank's KV: (out, lse) in their accumulator dtypes;
    with `rounded` (a caller that adds nothing to out), out may come in q's dtype instead, in
    `out` if given (q's dtype and rows, v's head_dim: a view into the caller's buffer), and lse
    rounded already (`returned_lse_dtype`)."""
    plan = ring.plan
    if rounded and plan.sole_block is not None:
        # a ring of one, or a call whose only block is the rank's own: the kernel writes out finished
        block = plan.sole_block
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device) if out is None else out
        lse = torch.empty(_lse_shape(q), dtype=returned_lse_dtype(q.dtype), device=q.device)
        rows = plan.q_sides[block.q_side]
        if rows is not None:  # rows no block selects: out 0, lse -inf
            out.zero_()
            lse.fill_(float("-inf"))
        q_rows, out_rows, lse_rows = _rows(q, rows, -3), _rows(out, rows, -3), _rows(lse, rows, -1)
        kernels = ring.backend.forward(q, k, softmax_scale=ring.softmax_scale, softcap=ring.softcap)
        kernels.step(q_rows, k, v, out_rows, lse_rows, mask=block.mask, accumulate=False, write_rounded=True)
        ring.end_of_call()
        return out, lse
    out_acc = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=accumulator_dtype(q.dtype), device=q.device)
    lse_acc = torch.empty(_lse_shape(q), dtype=LSE_ACCUMULATOR_DTYPE, device=q.device)
    if not plan.writes_first:
        lse_acc.fill_(float("-inf"))
        if plan.unselected_rows is None:
            out_acc.zero_()
        elif plan.unselected_rows.numel():
            out_acc.index_fill_(-3, plan.unselected_rows, 0.0)
    q_sides = [(_rows(q, rows, -3), _rows(out_acc, rows, -3), _rows(lse_acc, rows, -1)) for rows in plan.q_sides]
    kernels = ring.backend.forward(q, k, softmax_scale=ring.softmax_scale, softcap=ring.softcap)
    # rows that only the final block selects are written finished, in q's dtype, not through out_acc
    writes_final = rounded and plan.final_rows is not None and kernels.writes_rounded_varlen
    finished = _Finished(q, v, plan.final_rows, out) if writes_final else None
    kv = TravellingKV(plan, ring.transport, k, v)
    for step in plan.steps:
        kv.before_step(step.step)
        for block in step.blocks:
            if block.final and finished is not None:
                kernels.step(q, k, v, finished.out, finished.lse, mask=block.mask, accumulate=False, varlen=block.varlen, write_rounded=True)
                continue
            q_rows, out_rows, lse_rows = q_sides[block.q_side]
            k_rows, v_rows = (k, v) if block.local else kv.held(block.stream, block.kv_side)
            kernels.step(q_rows, k_rows, v_rows, out_rows, lse_rows, mask=block.mask, accumulate=block.accumulate, varlen=block.varlen)
    ring.end_of_call()
    if finished is not None:
        return finished.joined(out_acc, lse_acc, plan.unselected_rows)
    return out_acc, lse_acc


class _Finished:
    """The forward's out in q's dtype where the final block writes its rows finished (and lse in
    `returned_lse_dtype`, as the kernel writes it): `joined` rounds the other rows of both into
    them."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, rows: slice, out: torch.Tensor | None = None):
        self.rows = rows
        self.out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device) if out is None else out
        self.lse = torch.empty(_lse_shape(q), dtype=returned_lse_dtype(q.dtype), device=q.device)
        # its padding rows are no sequence's: lse -inf (out is zeroed in `joined`)
        self.lse[..., rows].fill_(float("-inf"))

    def joined(self, out_acc: torch.Tensor, lse_acc: torch.Tensor, unselected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`unselected`: every row no block selects (a plan with final rows lists them)."""
        others = slice(0, self.rows.start)
        self.out[..., others, :, :].copy_(out_acc[..., others, :, :])
        if unselected.numel():
            self.out.index_fill_(-3, unselected, 0.0)
        self.lse[..., others].copy_(lse_acc[..., others])
        return self.out, self.lse


def ring_backward(
    ring: Ring,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    dkv_dtype: torch.dtype | None = None,
    dkv_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (accumulator dtype or q's), dk and dv (new tensors in k's dtype, or `dkv_dtype` for a
    caller that adds them to other ranks' before rounding) of the local shard. `dkv_sums`: the
    unfinished dK/dV of earlier calls over the same K and V (`ring_backward_sums`), which this
    call's kernels add to before the one finish."""
    plan = ring.plan
    grads = _backward_pass(ring, q, out, lse, dout, dlse)
    if dkv_dtype is None and dkv_sums is None and plan.steps and plan.sole_block is not None and grads.can_write_rounded(k):
        # a ring of one, or a call whose only block is the rank's own: the kernel writes dK/dV finished
        block = plan.sole_block
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        grads.step(k, v, dk, dv, q_rows=_q_rows(plan)[block.q_side], mask=block.mask, write_rounded=True)
        ring.end_of_call()
        return grads.dq(), dk, dv
    local, travelled, indexed = _dkv_pass(ring, grads, k, v, dkv_sums)
    if dkv_dtype is not None:
        return (grads.dq(), *finished_dkv(local, travelled, k, v, grads.dk_scale, dkv_dtype, indexed))
    return (grads.dq(), *grads.finish_dkv(local, travelled, k, v, indexed))


def ring_backward_sums(
    ring: Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    dlse: torch.Tensor | None, dkv_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dq, and dK/dV left unfinished for a later call over the same K and V to add to and finish
    (`ring_backward`'s `dkv_sums`; head chunks that read one KV head): one fp32 pair (2, ..., rows,
    heads, width), dK in the kernels' units, in a tensor of its own. The chunks' sums are rounded
    once, by the finish that rounds a single call's, with no sum, scale or copy between them."""
    grads = _backward_pass(ring, q, out, lse, dout, dlse)
    local, travelled, indexed = _dkv_pass(ring, grads, k, v, dkv_sums)
    return grads.dq(), summed_dkv(local, travelled, k, v, indexed, owned=True)


def _backward_pass(ring: Ring, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None):
    """The backend's backward pass for the call, before its steps."""
    return ring.backend.backward(
        q, out, lse, dout, dlse, softmax_scale=ring.softmax_scale, softcap=ring.softcap, deterministic=ring.deterministic,
    )


def _dkv_pass(
    ring: Ring, grads, k: torch.Tensor, v: torch.Tensor, dkv_sums: torch.Tensor | None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], tuple]:
    """The backward's steps: the local dK/dV sums (`dkv_sums` added to, where given), and the
    partial sums that travelled home, over k's first rows and at rows of their own."""
    plan = ring.plan
    if not plan.steps:
        return dkv_sums, [], ()
    q_rows = _q_rows(plan)
    dtype = accumulator_dtype(k.dtype)
    kv = TravellingKV(plan, ring.transport, k, v)
    dkv = TravellingDKV(plan, ring.transport, k, v, dtype)
    # dK/dV that local blocks add: they never travel
    local_dkv = dkv_sums
    if local_dkv is None and plan.has_local_blocks:
        local_dkv = torch.zeros(pair_shape(k, v), dtype=dtype, device=k.device)
    local_sums = None if local_dkv is None else pair_views(local_dkv, k.shape[-1], v.shape[-1])
    for step in plan.steps:
        kv.before_step(step.step)
        first = step.blocks[0] if step.blocks else None
        writes_whole = first is not None and dkv.starts_chain(first.stream, step.step) and _writes_whole_buffer(first, plan, grads, k)
        reading = dkv.begin_step(step.step, first.stream if writes_whole else None)
        for block in step.blocks:
            rows = q_rows[block.q_side]
            if block.local:
                (k_rows, v_rows), (dk_rows, dv_rows) = (k, v), local_sums
            else:
                k_rows, v_rows = kv.held(block.stream, block.kv_side)
                dk_rows, dv_rows = dkv.accumulator(block.stream, block.kv_side)
            grads.step(k_rows, v_rows, dk_rows, dv_rows, q_rows=rows, mask=block.mask, varlen=block.varlen, write_first=writes_whole and block is first)
        dkv.end_step(reading)
    travelled, indexed = dkv.at_home()
    ring.end_of_call()
    return local_dkv, travelled, tuple(indexed)


def _q_rows(plan: RankPlan) -> list[slice]:
    return [slice(None) if rows is None else rows for rows in plan.q_sides]


def _writes_whole_buffer(block, plan: RankPlan, grads, k: torch.Tensor) -> bool:
    """Whether `block`, first of a chain's first step, can write its dK/dV buffer whole: a dense
    block against every row of a stream of all of K and V, with a backend that writes first for
    these heads."""
    stream = plan.streams[block.stream]
    return (
        not block.local and block.varlen is None and plan.kv_sides[block.kv_side] is None
        and stream.capacity is None and stream.own_rows is None and grads.can_write_first(k)
    )
