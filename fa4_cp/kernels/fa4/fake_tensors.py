"""Symbolic row shapes for compiling a block kernel without tensors: dense or varlen."""

from __future__ import annotations

from dataclasses import dataclass

import cutlass.cute as cute
from cutlass import Int32
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
