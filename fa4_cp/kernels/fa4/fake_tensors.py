"""Symbolic row shapes for compiling a block kernel without tensors: dense or varlen; and the
tensor arguments of FA4's backward kernel, Hopper's and Blackwell's alike."""

from __future__ import annotations

from dataclasses import dataclass

import cutlass.cute as cute
from cutlass import Float32, Int32
from quack.compile_utils import make_fake_tensor


@dataclass(frozen=True)
class FakeBlockRows:
    """Leading dims of q-side and kv-side tensors ((batch, seqlen) dense, (total,) varlen), of
    per-row statistics ((batch,) dense, () varlen), and the varlen row tensors (None dense)."""

    rows_q: tuple
    rows_k: tuple
    lead: tuple
    cu_seqlens_q: object
    cu_seqlens_k: object
    seqused_q: object
    seqused_k: object

    @staticmethod
    def make(varlen: bool) -> FakeBlockRows:
        sym = cute.sym_int
        if not varlen:
            batch = sym()
            return FakeBlockRows((batch, sym()), (batch, sym()), (batch,), None, None, None, None)
        sequences, bounds = sym(), sym()  # bounds = sequences + 1
        cu_q, cu_k = (make_fake_tensor(Int32, (bounds,)) for _ in range(2))
        used_q, used_k = (make_fake_tensor(Int32, (sequences,)) for _ in range(2))
        return FakeBlockRows((sym(),), (sym(),), (), cu_q, cu_k, used_q, used_k)

    @property
    def varlen_tensors(self) -> tuple:
        return self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_q, self.seqused_k


@dataclass(frozen=True)
class FakeBackwardArguments:
    """The tensors FA4's backward kernel takes, symbolic: q, k, v, dout, lse_log2, dpsum, dq_accum,
    dk, dv (`tensors`, in that order), their rows (`block`) and head counts."""

    block: FakeBlockRows
    heads: object
    kv_heads: object
    tensors: tuple

    @staticmethod
    def make(dtype, head_dim: int, head_dim_v: int, varlen: bool, dkv_dtype=Float32) -> FakeBackwardArguments:
        sym = cute.sym_int
        heads, kv_heads = sym(), sym()
        block = FakeBlockRows.make(varlen)
        rows_q, rows_k, lead = block.rows_q, block.rows_k, block.lead
        vector = 128 // dtype.width
        q = make_fake_tensor(dtype, (*rows_q, heads, head_dim), divisibility=vector)
        dout = make_fake_tensor(dtype, (*rows_q, heads, head_dim_v), divisibility=vector)
        k, v = (make_fake_tensor(dtype, (*rows_k, kv_heads, dim), divisibility=vector) for dim in (head_dim, head_dim_v))
        rows_padded = sym()
        lse_log2, dpsum = (make_fake_tensor(Float32, (*lead, heads, rows_padded), divisibility=4) for _ in range(2))
        dq_accum = make_fake_tensor(Float32, (*lead, heads, sym()), divisibility=4)
        dk, dv = (make_fake_tensor(dkv_dtype, (*rows_k, kv_heads, dim), divisibility=128 // dkv_dtype.width) for dim in (head_dim, head_dim_v))
        return FakeBackwardArguments(block, heads, kv_heads, (q, k, v, dout, lse_log2, dpsum, dq_accum, dk, dv))

    def semaphores(self, ctas: int = 1) -> tuple:
        """Upstream's deterministic turn counters: dq (b, h, m blocks, `ctas` a tile), dK and dV
        (b, h_kv, n blocks, 2); varlen: b is the launch's sequences."""
        sym = cute.sym_int
        lead = self.block.lead or (sym(),)
        return (
            make_fake_tensor(Int32, (*lead, self.heads, sym(), ctas)),
            *(make_fake_tensor(Int32, (*lead, self.kv_heads, sym(), 2)) for _ in range(2)),
        )
