"""The baseline of bench/ring.py: torch's own context parallelism (`context_parallel`, SDPA).

Full-sequence q, k, v in (b, h, S, d), identical on every rank (same seed), are sharded in place
by `context_parallel` with torch's head-tail load balancer (the layout of fa4_cp's zigzag); KV
is all-gathered once per call (rotate method "allgather"). GQA is tried with enable_gqa=True
first; if that fails, the KV heads are repeated in memory and the entry says so.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ring_timing import measure, run_agreed

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _set_allgather_rotation() -> None:
    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:  # a release whose stub module does not re-export it
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method
    set_rotate_method("allgather")


def _measure(mesh, shape: tuple[int, ...], dtype: torch.dtype, backward: bool, repeat_kv: bool, sdpa: str, warmup: int, iters: int, device: torch.device) -> dict:
    from torch.distributed.tensor.experimental import context_parallel

    batch, heads, kv_heads, seq, dim = shape
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, generator=generator)
    k, v = (torch.randn(batch, kv_heads, seq, dim, device=device, dtype=dtype, generator=generator) for _ in range(2))
    if repeat_kv:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    gqa = {"enable_gqa": True} if k.shape[1] != heads else {}
    buffers = [q, k, v]
    with sdpa_kernel(SDPA_BACKENDS[sdpa]), context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(buffers)):
        # From here q, k, v hold this rank's shards.
        for t in buffers:
            t.requires_grad_(backward)
        # dout takes out's strides: cuDNN's backward asserts that they match.
        dout = torch.randn_like(F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)) if backward else None

        def call() -> None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
            if backward:
                out.backward(dout)
                q.grad = k.grad = v.grad = None

        result = measure(call, warmup=warmup, iters=iters, device=device)
        result["input_bytes"] = sum(t.nbytes for t in (q, k, v)) + (dout.nbytes if backward else 0)
        result["output_bytes"] = q.nbytes + (q.nbytes + k.nbytes + v.nbytes if backward else 0)
    return result


def torch_context_parallel(
    mesh, shape: tuple[int, ...], dtype: torch.dtype, backward: bool, sdpa: str, warmup: int, iters: int, device: torch.device
) -> dict:
    """Time (ms of the slowest rank), memory and how GQA ran, for `shape` (b, h, h_kv, S, d);
    {"error": ...} if no variant ran."""
    _set_allgather_rotation()
    heads, kv_heads = shape[1], shape[2]
    errors: list[str] = []
    for repeat_kv in (False, True) if kv_heads != heads else (False,):
        run = functools.partial(_measure, mesh, shape, dtype, backward, repeat_kv, sdpa, warmup, iters, device)
        result, error = run_agreed(run, device)
        if error is None:
            gqa = "none" if kv_heads == heads else "repeated_kv" if repeat_kv else "enable_gqa"
            return result | {"sdpa_backend": sdpa, "rotate_method": "allgather", "gqa": gqa, "failed_variants": errors}
        errors.append(error)
    return {"error": " | ".join(errors)}
