"""The FA4 backend: the kernel interface on NVIDIA Hopper (sm90) and Blackwell (sm100) GPUs."""

from __future__ import annotations

import functools

import torch

from .backward_pass_sm100 import Sm100BackwardPass
from .backward_pass_sm90 import Sm90BackwardPass
from .passes_sm100 import MergeAfterForwardPass, UpstreamBackwardPass
from .forward_pass_sm90 import Sm90ForwardPass
from .merge_kernel import merge_partials_cuda

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
FORWARD_HEAD_DIMS = (64, 96, 128, 192, 256)
BACKWARD_HEAD_DIMS = (64, 96, 128, 192, 256)
"""192 and 256 (one Q stage, backward_sm90.BackwardTiles): tests/gpu/test_fa4_backend.py passed on
an H200 (2026-12-05), every mask, bf16 and fp16."""
NARROW_V_HEAD_DIMS = ((192, 128),)
"""(q and k head_dim, v head_dim) pairs besides equal ones: DeepSeek-V3's MLA, the pair upstream
FA4 takes on Hopper."""


@functools.lru_cache(maxsize=16)
def fa4_arch(device: torch.device) -> int | None:
    """9 for Hopper, 10 for Blackwell datacenter parts, None where this backend cannot run."""
    if device.type != "cuda":
        return None
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in (9, 10) else None


def check_inputs(q: torch.Tensor, *, backward: bool = False, v_head_dim: int | None = None) -> None:
    """ValueError naming what the FA4 kernels cannot take."""
    if fa4_arch(q.device) is None:
        raise ValueError(f"backend 'fa4': expected q on an sm90 or sm100 CUDA device, got {q.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"backend 'fa4': expected bfloat16 or float16 q, k, v, got {q.dtype}")
    dims = BACKWARD_HEAD_DIMS if backward else FORWARD_HEAD_DIMS
    if q.shape[-1] not in dims:
        raise ValueError(f"backend 'fa4': head_dim must be one of {dims}{' for the backward' if backward else ''}, got {q.shape[-1]}")
    if v_head_dim is not None and v_head_dim != q.shape[-1] and (q.shape[-1], v_head_dim) not in NARROW_V_HEAD_DIMS:
        raise ValueError(
            f"backend 'fa4': v's head_dim must equal q's and k's ({q.shape[-1]}), or (head_dim, v head_dim) be one of "
            f"{NARROW_V_HEAD_DIMS}, got ({q.shape[-1]}, {v_head_dim})"
        )


class FA4Backend:
    """FlashAttention-4 kernels with LSE partials (see `AttentionBackend`).

    Hopper: the forward merges each tile into the accumulators in its epilogue (no extra pass,
    no 16-bit rounding per step), or with `fused_merge=False` runs upstream's forward and the
    stand-alone merge kernel (the baseline). The backward accumulates dq in FA4's own layout
    across the steps of a call, and dK/dV in the ring's fp32 buffers from inside the kernel.
    Blackwell (untested here): the forward and, at head_dim 256, the backward as passes_sm100.py
    runs them; the other backwards accumulate dK/dV inside the kernel as on Hopper
    (backward_pass_sm100.py). The inputs and the architecture are checked once
    per pass, not per step.
    """

    name = "fa4"

    def __init__(self, fused_merge: bool = True):
        self.fused_merge = fused_merge

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, softmax_scale: float, softcap: float | None = None):
        check_inputs(q)
        if fa4_arch(q.device) == 9 and self.fused_merge:
            return Sm90ForwardPass(q, k, softmax_scale, softcap)
        return MergeAfterForwardPass(softmax_scale, softcap)

    def backward(self, q, out, lse, dout, dlse, *, softmax_scale: float, softcap: float | None = None, deterministic: bool = False):
        check_inputs(q, backward=True)
        if fa4_arch(q.device) == 9:
            return Sm90BackwardPass(q, out, lse, dout, dlse, softmax_scale, softcap, deterministic)
        if Sm100BackwardPass.takes(q, dout):
            return Sm100BackwardPass(q, out, lse, dout, dlse, softmax_scale, softcap, deterministic)
        return UpstreamBackwardPass(q, out, lse, dout, dlse, softmax_scale, softcap, deterministic)


@functools.cache
def shared_backend() -> FA4Backend:
    """The instance "auto" and "fa4" resolve to."""
    return FA4Backend()


__all__ = ["FA4Backend", "check_inputs", "fa4_arch", "merge_partials_cuda", "shared_backend"]
