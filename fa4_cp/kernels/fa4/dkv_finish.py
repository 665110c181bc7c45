"""dK and dV of a ring call finished in one CuTe-DSL pass: the local sums plus the partial sums
that travelled home (one or two chains over k's first rows, and up to four chains of streams of
some rows, each read through its rows' positions), dK scaled into its units, both rounded once to
k's dtype, into two new tensors.

In torch this is up to four passes over fp32 buffers (the chains' sum, its add into the local
sums, the scale, the conversions). The caller's tensors are viewed as (2, batch, rows, heads *
head_dim); each thread finishes `VECTOR` neighbouring values of a row at a time, read and written
as vectors (32 bytes of each fp32 sum, 16 of dK or dV), `GROUPS_PER_THREAD` groups of one (batch,
dK or dV), a CTA's threads neighbours, so that rows of any width read coalesced and a CTA has
work however narrow the row.
"""

from __future__ import annotations

import functools

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from flash_attn.cute.interface import torch2cute_dtype_map
from quack.compile_utils import make_fake_tensor

from ..interface import IndexedSums
from .compile_cache import kernel_cache

THREADS = 128
VECTOR = 8  # values a thread finishes at once: every width (heads x head_dim) is a multiple
GROUPS_PER_THREAD = 2
MAX_TRAVELLED = 2  # the two chains of partial sums of a stream of all rows (runtime/travelling.py)
MAX_INDEXED = 4  # the two chains of each of the balanced layout's two streams
_compiled = kernel_cache("dkv_finish")


@cute.jit
def _group(row: cute.Tensor, group) -> cute.Tensor:
    """Values VECTOR * group .. VECTOR * (group + 1) - 1 of a row."""
    return cute.local_tile(row, (VECTOR,), (group,))


@cute.jit
def _add_group(total: cute.Tensor, part: cute.Tensor, t: cute.Tensor, which, batch, row, group) -> None:
    """total += the group's values of row `row` of t[which, batch] (one vector load)."""
    cute.autovec_copy(_group(t[which, batch, row, None], group), part)
    total.store(total.load() + part.load())


@cute.jit
def _add_at_position(total: cute.Tensor, part: cute.Tensor, sums: cute.Tensor, positions: cute.Tensor, which, batch, row, group) -> None:
    """total += the group's values of sums at row positions[row], where the row is among the sums'."""
    position = positions[row]
    if position >= 0:
        if position < sums.shape[2]:
            _add_group(total, part, sums, which, batch, position, group)


class FinishDkv:
    def __init__(self, has_local: bool, travelled: int, indexed: int):
        self.has_local, self.travelled, self.indexed = has_local, travelled, indexed

    @cute.jit
    def __call__(self, mLocal: cute.Tensor, mPart0: cute.Tensor, mPart1: cute.Tensor, mIndexed0: cute.Tensor, mIndexed1: cute.Tensor,
                 mIndexed2: cute.Tensor, mIndexed3: cute.Tensor, mPositions0: cute.Tensor, mPositions1: cute.Tensor,
                 mPositions2: cute.Tensor, mPositions3: cute.Tensor, mDk: cute.Tensor, mDv: cute.Tensor, dk_scale: Float32, stream):
        # sums (2, batch, rows, width), the parts' rows the travelled ones (the first), the indexed
        # ones' their own, read through positions (rows,); mDk, mDv (batch, rows, width): two
        # tensors, as autograd wants outputs that share no storage
        self.kernel(
            mLocal, mPart0, mPart1, mIndexed0, mIndexed1, mIndexed2, mIndexed3, mPositions0, mPositions1, mPositions2, mPositions3,
            mDk, mDv, dk_scale,
        ).launch(
            grid=[cute.ceil_div(mDk.shape[1] * mDk.shape[2] // VECTOR, THREADS * GROUPS_PER_THREAD), mDk.shape[0], 2],
            block=[THREADS, 1, 1], stream=stream,
        )

    @cute.kernel
    def kernel(self, mLocal: cute.Tensor, mPart0: cute.Tensor, mPart1: cute.Tensor, mIndexed0: cute.Tensor, mIndexed1: cute.Tensor,
               mIndexed2: cute.Tensor, mIndexed3: cute.Tensor, mPositions0: cute.Tensor, mPositions1: cute.Tensor,
               mPositions2: cute.Tensor, mPositions3: cute.Tensor, mDk: cute.Tensor, mDv: cute.Tensor, dk_scale: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        block, batch, which = cute.arch.block_idx()
        rows, groups = mDk.shape[1], mDk.shape[2] // VECTOR
        total = cute.make_rmem_tensor((VECTOR,), Float32)
        part = cute.make_rmem_tensor((VECTOR,), Float32)
        rounded = cute.make_rmem_tensor((VECTOR,), mDk.element_type)
        for i in cutlass.range_constexpr(GROUPS_PER_THREAD):
            index = (block * GROUPS_PER_THREAD + i) * THREADS + tidx
            if index < rows * groups:
                row = index // groups
                group = index % groups
                if cutlass.const_expr(self.has_local):
                    cute.autovec_copy(_group(mLocal[which, batch, row, None], group), total)
                else:
                    total.fill(0.0)
                if cutlass.const_expr(self.travelled > 0):
                    if row < mPart0.shape[2]:
                        _add_group(total, part, mPart0, which, batch, row, group)
                        if cutlass.const_expr(self.travelled > 1):
                            _add_group(total, part, mPart1, which, batch, row, group)
                indexed = ((mIndexed0, mPositions0), (mIndexed1, mPositions1), (mIndexed2, mPositions2), (mIndexed3, mPositions3))
                for sums, positions in indexed[: self.indexed]:
                    _add_at_position(total, part, sums, positions, which, batch, row, group)
                if which == 0:
                    rounded.store((total.load() * dk_scale).to(mDk.element_type))
                    cute.autovec_copy(rounded, _group(mDk[batch, row, None], group))
                else:
                    rounded.store(total.load().to(mDv.element_type))
                    cute.autovec_copy(rounded, _group(mDv[batch, row, None], group))


def finish_dkv_cuda(
    local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, dk_scale: float, indexed: tuple[IndexedSums, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """local: (2, *k.shape) fp32 or None; travelled: (2, ..., rows, h, d) fp32 sums over k's first
    rows; indexed: fp32 sums at rows of their own (varlen k only). Returns (dK * dk_scale, dV) as
    new tensors of k's dtype."""
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    if local is None and not travelled and not indexed:
        return dk.zero_(), dv.zero_()
    if (k.shape[-2] * k.shape[-1]) % VECTOR:
        raise ValueError(f"dK/dV finish: heads x head_dim must be a multiple of {VECTOR}, got {k.shape[-2]} x {k.shape[-1]}")
    if k[0].numel() >= 2**31:
        raise ValueError(f"dK/dV finish: a batch entry of k holds {k[0].numel()} values, the kernel indexes below 2**31")
    if len(travelled) > MAX_TRAVELLED or len(indexed) > MAX_INDEXED:
        raise ValueError(f"dK/dV finish: at most {MAX_TRAVELLED} travelled and {MAX_INDEXED} indexed sums, got {len(travelled)} and {len(indexed)}")
    if indexed and k.dim() != 3:
        raise ValueError("dK/dV finish: indexed sums need varlen k (rows, heads, head_dim)")
    key = (str(k.dtype), local is not None, len(travelled), len(indexed))
    if key not in _compiled:
        _compiled[key] = _compile(torch2cute_dtype_map[k.dtype], local is not None, len(travelled), len(indexed))
    views = [_rows_view(t) for t in travelled]
    indexed_views = [_rows_view(part.sums) for part in indexed]
    first = (views or indexed_views)[0] if local is None else None
    local_view = _rows_view(local) if local is not None else first  # unread without local sums
    parts = views + [local_view] * (MAX_TRAVELLED - len(views))  # placeholders the kernel never reads
    sums = indexed_views + [local_view] * (MAX_INDEXED - len(indexed))
    positions = [part.positions for part in indexed]
    positions += [positions[0] if positions else _no_positions(k.device)] * (MAX_INDEXED - len(positions))
    _compiled[key](local_view, *parts, *sums, *positions, _rows_view(dk[None])[0], _rows_view(dv[None])[0], dk_scale)
    return dk, dv


@functools.lru_cache(maxsize=8)
def _no_positions(device: torch.device) -> torch.Tensor:
    """The positions placeholder where no sums are indexed (never read)."""
    return torch.full((1,), -1, dtype=torch.int32, device=device)


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(2, [batch,] rows, heads, head_dim) -> (2, batch, rows, heads * head_dim)."""
    if t.dim() == 4:  # varlen
        t = t.unsqueeze(1)
    return t.flatten(-2)


def _compile(dtype, has_local: bool, travelled: int, indexed: int):
    sym = cute.sym_int
    batch, rows, width = sym(), sym(), sym()
    # rows of whole vectors: strides and bases divisible by VECTOR values
    local = make_fake_tensor(Float32, (2, batch, sym(), width), divisibility=VECTOR)  # dK's rows; a placeholder's differ
    parts = [make_fake_tensor(Float32, (2, batch, sym(), width), divisibility=VECTOR) for _ in range(MAX_TRAVELLED + MAX_INDEXED)]
    positions = [make_fake_tensor(Int32, (sym(),)) for _ in range(MAX_INDEXED)]
    dk, dv = (make_fake_tensor(dtype, (batch, rows, width), divisibility=VECTOR) for _ in range(2))
    return cute.compile(
        FinishDkv(has_local, travelled, indexed), local, *parts, *positions, dk, dv, Float32(1.0),
        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        options="--enable-tvm-ffi",
    )
