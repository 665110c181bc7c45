"""How the accumulating backward kernels (Hopper's and Blackwell's) present the caller's fp32 dK/dV
row buffers to upstream's set-up, which takes them for its own GQA accumulators: the route those
take (`OneHeadAsGroup`), and a layout that carries K's (rows, head_dim) through upstream's
permutation whole to the epilogue (`rows_carrier`, `block_rows`)."""

from __future__ import annotations

import cutlass.cute as cute
from cutlass import Int32, const_expr


class OneHeadAsGroup(int):
    """A GQA ratio of 1 that upstream's set-up reads as a group. Upstream routes on
    `qhead_per_kvhead == 1` (16-bit dK/dV through TMA) against `> 1` (fp32 accumulators, a kv head
    index divided by the ratio, dK left unscaled); the accumulating kernels always take the second
    route, so their ratio of 1 answers as a group there, while its value (the divisor, the `%` of
    the dK/dV turn) stays 1."""

    def __eq__(self, other):
        return False if other == 1 else int.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __gt__(self, other):
        return True if other == 1 else int.__gt__(self, other)

    __hash__ = int.__hash__


@cute.jit
def rows_carrier(rows: cute.Tensor) -> cute.Tensor:
    """(b, s, h, d) -> (b, h, (s, d)); varlen (total, h, d) -> (h, (total, d))."""
    if const_expr(cute.rank(rows) == 4):
        shape = (rows.shape[0], rows.shape[2], (rows.shape[1], rows.shape[3]))
        stride = (rows.stride[0], rows.stride[2], (rows.stride[1], rows.stride[3]))
    else:
        shape = (rows.shape[1], (rows.shape[0], rows.shape[2]))
        stride = (rows.stride[1], (rows.stride[0], rows.stride[2]))
    return cute.make_tensor(rows.iterator, cute.make_layout(shape, stride=stride))


@cute.jit
def block_rows(carried: cute.Tensor, seqlen, head_kv: Int32, batch_idx: Int32) -> cute.Tensor:
    """The (rows, d) buffer of one kv head and batch (dense) or sequence (varlen), from the
    carrier as upstream's set-up permuted it: ((s, d), h, b) or ((total, d), h)."""
    if const_expr(cute.rank(carried) == 3):
        per_head = carried[None, head_kv, batch_idx]
    else:
        per_head = carried[None, head_kv]
    rows = cute.make_tensor(per_head.iterator, cute.make_layout(per_head.shape[0], stride=per_head.stride[0]))
    if const_expr(seqlen.has_cu_seqlens_k):
        rows = cute.domain_offset((seqlen.offset_k, 0), rows)
    return rows
