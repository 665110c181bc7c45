"""The Ulysses all-to-all: sequence shards to head shards over the ulysses ranks, and back.

Rank i of u holds rows piece i of its ring rank's rows, all heads. Before the ring, every rank
sends head group j of its piece to rank j and stacks the pieces it receives in rank order: it then
holds all of the ring rank's rows for head group i. After the ring, the reverse exchange brings
each rank its own rows of every head group. The backward of one exchange is the other. The
exchanges go through the call's transport where it copies into peers (comm/all_to_all.py: the
copy engine's take no SM), else through the group's all_to_all_single.

`ulysses_forward` and `ulysses_backward` are the stage a 2-D call runs around its ring: r steps
of u-times larger blocks replace W steps, with every mask, layout and document feature of the
ring. KV heads fewer than u are repeated to u (one per rank), never to h. The forward returns,
besides out and lse, the head-sharded tensors its backward reads, padded to u x the local rows so
that their shapes follow from q's (the ring's own rows depend on the documents' lengths).
"""

from __future__ import annotations

import math

import torch

from ..call import PreparedCall
from ..comm.all_to_all import all_to_all
from ..comm.group import RingGroup
from ..comm.mesh import UlyssesRing
from ..comm.transport import TransportKind
from ..kernels.interface import accumulator_dtype
from .ring_run import ring_run_backward, ring_run_forward


class Exchange:
    """The all-to-alls of one call over the ulysses group: through the ring call's transport kind
    when it copies into its peers (the copy engine, no SM), else the group's collective."""

    def __init__(self, group: RingGroup, transport: TransportKind, device: torch.device):
        self.group = group
        self.transport = group.transport(transport, device) if group.world_size > 1 else None

    def _run(self, xs: list[torch.Tensor], split_dim: int, cat_dim: int, padded: int | None = None) -> list[torch.Tensor]:
        """One all-to-all for all of `xs` (one dtype): what a rank sends a peer of each travels as one piece."""
        if self.transport is None:
            return [x if padded is None else _pad_rows(x, padded, split_dim) for x in xs]
        ranks = self.group.world_size
        if len(xs) == 1:
            pieces = _pieces(xs[0], ranks, split_dim, xs[0].shape[split_dim] if padded is None else padded)
            return [torch.cat(all_to_all(self.group, self.transport, pieces, "the Ulysses all-to-all"), dim=cat_dim)]
        packed = _packed_pieces(xs, ranks, split_dim)  # the pieces for rank j, of every tensor, in row j
        arrived = all_to_all(self.group, self.transport, list(packed.unbind(0)), "the Ulysses all-to-all")
        outputs, start = [], 0
        for x in xs:
            shape = _piece_shape(x, ranks, split_dim)
            size = math.prod(shape)
            outputs.append(torch.cat([piece[start : start + size].view(shape) for piece in arrived], dim=cat_dim))
            start += size
        return outputs

    def sequence_to_heads(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """(..., s/u, h, d) of every head -> (..., s, h/u, d) of this rank's head group, for each of
        `xs` (one dtype) in one exchange."""
        return self._run(list(xs), -2, -3)

    def heads_to_sequence(self, x: torch.Tensor, padded_rows: int | None = None) -> torch.Tensor:
        """The inverse of `sequence_to_heads`; x's rows taken as zero-padded to `padded_rows`."""
        return self._run([x], -3, -2, padded_rows)[0]

    def lse_heads_to_sequence(self, lse: torch.Tensor) -> torch.Tensor:
        """lse (..., h/u, s) of this rank's head group -> (..., h, s/u) of its own rows."""
        return self._run([lse], -1, -2)[0]

    def lse_sequence_to_heads(self, lse: torch.Tensor) -> torch.Tensor:
        """The inverse of `lse_heads_to_sequence`."""
        return self._run([lse], -2, -1)[0]


def kv_heads_for(kv_heads: int, ulysses: int) -> torch.Tensor | None:
    """Which KV heads travel to each ulysses rank when there are fewer than ranks: rank i's q
    heads all read KV head i * h_kv / u, so each KV head is repeated u / h_kv times, never to h.
    None when every rank takes h_kv / u heads of its own."""
    if kv_heads >= ulysses:
        return None
    return torch.tensor([i * kv_heads // ulysses for i in range(ulysses)])


def ulysses_forward(
    prepared: PreparedCall, mesh: UlyssesRing, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """out (q's shape) and lse of this rank's rows; then the head-sharded q, k, v, out and lse of
    its ring rank's rows, padded to u x the local rows, for the backward."""
    u, rows, padded_rows = mesh.ulysses.world_size, prepared.mesh.ring_rows, prepared.mesh.padded_ring_rows
    head_group = q.shape[-2] // u
    if (repeat := kv_heads_for(k.shape[-2], u)) is not None:
        k, v = (t.index_select(-2, repeat.to(t.device)) for t in (k, v))
    exchange = Exchange(mesh.ulysses, prepared.ring.transport, q.device)
    heads_q, heads_k, heads_v = exchange.sequence_to_heads(q, k, v)
    out, lse = ring_run_forward(
        prepared.ring, prepared.kernels, mesh.ring, *(t[..., :rows, :, :] for t in (heads_q, heads_k, heads_v)),
        _own_sinks(sinks, mesh.ulysses, head_group), padded_rows,
    )
    lse = _pad_rows(lse, padded_rows, -1, float("-inf"))  # padding rows: out 0, lse -inf
    return exchange.heads_to_sequence(out), exchange.lse_heads_to_sequence(lse), heads_q, heads_k, heads_v, out, lse


def ulysses_backward(
    prepared: PreparedCall, mesh: UlyssesRing, heads_q: torch.Tensor, heads_k: torch.Tensor, heads_v: torch.Tensor,
    heads_out: torch.Tensor, heads_lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, sinks: torch.Tensor | None,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's rows and the sinks' gradient (empty without sinks): the
    forward's all-to-alls in reverse around the ring's backward."""
    u, rows, padded_rows = mesh.ulysses.world_size, prepared.mesh.ring_rows, prepared.mesh.padded_ring_rows
    head_group = heads_q.shape[-2]
    exchange = Exchange(mesh.ulysses, prepared.ring.transport, dout.device)
    heads_dout, = exchange.sequence_to_heads(dout.contiguous())
    heads_dlse = None if dlse is None else exchange.lse_sequence_to_heads(dlse.contiguous())[..., :rows].contiguous()
    # A KV head repeated over ranks gets one partial dK/dV from each: they travel unrounded and
    # are added, in head order, before the one rounding (16-bit partials reached ~1.9x the error).
    repeated = kv_heads_for(kv_heads, u) is not None
    dq, dk, dv, ring_dsinks = ring_run_backward(
        prepared.ring, prepared.kernels, mesh.ring, *(t[..., :rows, :, :] for t in (heads_q, heads_k, heads_v, heads_out)),
        heads_lse[..., :rows], heads_dout[..., :rows, :, :], heads_dlse, _own_sinks(sinks, mesh.ulysses, head_group),
        dkv_dtype=accumulator_dtype(heads_k.dtype) if repeated else None,
    )
    dq, dk, dv = (exchange.heads_to_sequence(t, padded_rows) for t in (dq, dk, dv))
    if repeated:
        dk, dv = (t.unflatten(-2, (kv_heads, u // kv_heads)).sum(-2).to(heads_k.dtype) for t in (dk, dv))
    dsinks = dout.new_empty(0)
    if sinks is not None:
        dsinks = torch.zeros_like(sinks)
        dsinks[_own_heads(mesh.ulysses, head_group)] = ring_dsinks
    return dq, dk, dv, dsinks


def _pieces(x: torch.Tensor, count: int, dim: int, length: int) -> list[torch.Tensor]:
    """`count` equal contiguous pieces of x along `dim`, x taken as zero-padded to `length` there:
    contiguous pieces stay views, and only a piece that reaches past x's end is copied, with its
    padding, not the whole of x."""
    size, rows = length // count, x.shape[dim]
    if rows == length and size and not x.narrow(dim, 0, size).is_contiguous():
        # strided pieces (a head group, or rows of a batch): one copy lays them all out, not one each
        return list(_by_destination(x, count, dim).contiguous().unbind(0))
    starts = [min(index * size, rows) for index in range(count)]
    return [_pad_rows(x.narrow(dim, start, min(size, rows - start)), size, dim).contiguous() for start in starts]


def _by_destination(x: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """A view of x as (count, its pieces along `dim`): piece j, for rank j, first."""
    axis = dim % x.dim()
    return x.unflatten(axis, (count, x.shape[axis] // count)).movedim(axis, 0)


def _piece_shape(x: torch.Tensor, count: int, dim: int) -> tuple[int, ...]:
    shape = list(x.shape)
    shape[dim] //= count
    return tuple(shape)


def _packed_pieces(xs: list[torch.Tensor], count: int, dim: int) -> torch.Tensor:
    """(count, all pieces' elements): row j holds piece j of each of `xs`, one after another, each
    laid out by one copy."""
    sizes = [math.prod(_piece_shape(x, count, dim)) for x in xs]
    packed = xs[0].new_empty(count, sum(sizes))
    start = 0
    for x, size in zip(xs, sizes):
        pieces = _by_destination(x, count, dim)
        packed[:, start : start + size].view(pieces.shape).copy_(pieces)
        start += size
    return packed


def _pad_rows(t: torch.Tensor, rows: int, seq_dim: int, value: float = 0.0) -> torch.Tensor:
    """`t` with rows appended along `seq_dim` up to `rows` (the last ulysses piece's padding)."""
    missing = rows - t.shape[seq_dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[seq_dim] = missing
    return torch.cat([t, t.new_full(shape, value)], dim=seq_dim)


def _own_heads(group: RingGroup, head_group: int) -> slice:
    """The heads a ulysses rank runs the ring on."""
    return slice(group.rank * head_group, (group.rank + 1) * head_group)


def _own_sinks(sinks: torch.Tensor | None, group: RingGroup, head_group: int) -> torch.Tensor | None:
    return None if sinks is None else sinks[_own_heads(group, head_group)]
