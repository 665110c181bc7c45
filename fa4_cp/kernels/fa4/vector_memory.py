"""Global fp32 stores and reductions (sm90 PTX) for epilogues that write fp32 rows from MMA
registers: two floats where each thread holds pairs of adjacent columns, one where the MMA's
operands were swapped and a thread's pairs lie in adjacent rows; and an L2 prefetch, for rows an
epilogue will read."""

from __future__ import annotations

import cutlass.cute as cute
from cutlass import Float32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op


def _pair_asm(instruction: str, a: Float32, b: Float32, pointer: cute.Pointer, loc, ip) -> None:
    llvm.inline_asm(
        None,
        [pointer.toint(loc=loc, ip=ip).ir_value(), Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)],
        f"{instruction} [$0], {{$1, $2}};",
        "l,f,f",
        has_side_effects=True,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )


@dsl_user_op
def add_pair(a: Float32, b: Float32, pointer: cute.Pointer, *, loc=None, ip=None) -> None:
    """pointer[0] += a, pointer[1] += b as one relaxed gpu-scope reduction (8-byte aligned)."""
    _pair_asm("red.relaxed.gpu.global.add.v2.f32", a, b, pointer, loc, ip)


@dsl_user_op
def store_pair(a: Float32, b: Float32, pointer: cute.Pointer, *, loc=None, ip=None) -> None:
    """pointer[0] = a, pointer[1] = b (8-byte aligned)."""
    _pair_asm("st.global.v2.f32", a, b, pointer, loc, ip)


def _one_asm(instruction: str, a: Float32, pointer: cute.Pointer, loc, ip) -> None:
    llvm.inline_asm(
        None,
        [pointer.toint(loc=loc, ip=ip).ir_value(), Float32(a).ir_value(loc=loc, ip=ip)],
        f"{instruction} [$0], $1;",
        "l,f",
        has_side_effects=True,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )


@dsl_user_op
def add_one(a: Float32, pointer: cute.Pointer, *, loc=None, ip=None) -> None:
    """pointer[0] += a as a relaxed gpu-scope reduction."""
    _one_asm("red.relaxed.gpu.global.add.f32", a, pointer, loc, ip)


@dsl_user_op
def store_one(a: Float32, pointer: cute.Pointer, *, loc=None, ip=None) -> None:
    """pointer[0] = a."""
    _one_asm("st.global.f32", a, pointer, loc, ip)


@dsl_user_op
def prefetch_l2(pointer: cute.Pointer, *, loc=None, ip=None) -> None:
    """Bring the cache line holding pointer[0] into L2, without waiting for it."""
    llvm.inline_asm(
        None,
        [pointer.toint(loc=loc, ip=ip).ir_value()],
        "prefetch.global.L2 [$0];",
        "l",
        has_side_effects=True,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )
