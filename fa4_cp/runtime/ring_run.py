"""The ring of a call already validated and agreed on: the rank's cached plan, the group's
transport, the executor, then the sinks. A 1-D call runs it as is; a 2-D call runs it between
the Ulysses all-to-alls (ulysses.py), on the head-sharded rows."""

from __future__ import annotations

import torch

from ..call import RingCall
from ..comm.group import RingGroup
from ..kernels import AttentionBackend, returned_lse_dtype
from ..plan.rows import rank_plan
from ..sinks import add_sinks, sinks_grad
from .executor import Ring, ring_backward, ring_backward_sums, ring_forward


def ring_run_forward(
    call: RingCall, kernels: AttentionBackend, group: RingGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    sinks: torch.Tensor | None, padded_rows: int | None = None, into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's dtype; with zero rows appended up to `padded_rows`; in `into` if given) and the
    LSE rounded once (`returned_lse_dtype`), sinks included. Without sinks nothing is added to
    out, so the ring may write its rows finished, in place (the kept documents' rows; every row
    of a sole block), and round only the rest into it."""
    rows = q.shape[-3]
    placed = into is not None or padded_rows not in (None, rows)
    if placed:
        into = q.new_empty((*q.shape[:-3], padded_rows or rows, q.shape[-2], v.shape[-1])) if into is None else into
        into.narrow(-3, rows, into.shape[-3] - rows).zero_()
    own_rows = into.narrow(-3, 0, rows) if placed else None
    out_acc, lse = ring_forward(_ring(call, kernels, group, q), q, k, v, rounded=sinks is None, out=own_rows)
    if sinks is not None:
        lse = add_sinks(out_acc, lse, sinks)
    lse = lse.to(returned_lse_dtype(q.dtype))  # no copy where it came rounded
    if not placed:
        return out_acc.to(q.dtype), lse  # no copy where it came rounded
    if out_acc is not own_rows:
        own_rows.copy_(out_acc)
    return into, lse


def ring_run_backward(
    call: RingCall, kernels: AttentionBackend, group: RingGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, sinks: torch.Tensor | None,
    dkv_dtype: torch.dtype | None = None, dkv_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (q's dtype), dk, dv (k's dtype, or `dkv_dtype`; `dkv_sums` added: executor.ring_backward)
    and the sinks' gradient (empty without sinks)."""
    dout, dlse = _dense(dout, dlse)
    dq, dk, dv = ring_backward(_ring(call, kernels, group, q), q, k, v, out, lse, dout, dlse, dkv_dtype, dkv_sums)
    return dq.to(q.dtype), dk, dv, _sinks_grad(out, lse, dout, dlse, sinks, group, q)


def ring_run_backward_sums(
    call: RingCall, kernels: AttentionBackend, group: RingGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, sinks: torch.Tensor | None,
    dkv_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (q's dtype), dK/dV left unfinished for a later call over the same K and V
    (executor.ring_backward_sums) and the sinks' gradient (empty without sinks)."""
    dout, dlse = _dense(dout, dlse)
    dq, sums = ring_backward_sums(_ring(call, kernels, group, q), q, k, v, out, lse, dout, dlse, dkv_sums)
    return dq.to(q.dtype), sums, _sinks_grad(out, lse, dout, dlse, sinks, group, q)


def _dense(dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A reduction's gradient arrives broadcast (stride 0); kernels need dense rows."""
    return dout.contiguous(), None if dlse is None else dlse.contiguous()


def _sinks_grad(
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, sinks: torch.Tensor | None, group: RingGroup,
    q: torch.Tensor,
) -> torch.Tensor:
    return q.new_empty(0) if sinks is None else sinks_grad(out, lse, dout, dlse, sinks, group)


def _ring(call: RingCall, kernels: AttentionBackend, group: RingGroup, q: torch.Tensor) -> Ring:
    transport = group.transport(call.transport, q.device)
    plan = rank_plan(call.sharding, call.mask, group.rank, q.device)
    return Ring(plan, transport, kernels, call.softmax_scale, call.softcap, call.deterministic)
