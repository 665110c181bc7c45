"""A steady-state ring call never makes the host wait for the GPU: torch's sync debug mode turns
any synchronizing op inside the forward and backward into an error. A wait there costs the host
its lead over the GPU at every layer (a varlen side's row map once did, through repeat_interleave).
The first call plans and compiles; the second is checked. Packed documents pass their cu_seqlens
on the host, as a data loader makes them."""

import pytest
import torch

import fa4_cp

if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
    pytest.skip("needs a Hopper GPU", allow_module_level=True)
pytest.importorskip("flash_attn.cute")


def dense_call(q, k, v):
    return fa4_cp.ring_attention(q, k, v, causal=True, backend="fa4")


def packed_call(q, k, v, cu_seqlens=torch.tensor([0, 700, 730, 2048], dtype=torch.int32)):
    return fa4_cp.ring_attention_varlen(q, k, v, cu_seqlens, causal=True, backend="fa4")


@pytest.mark.parametrize("call", [dense_call, packed_call], ids=["dense", "packed"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_a_steady_state_call_never_waits_for_the_gpu(call, kv_heads):
    rows = (1, 2048) if call is dense_call else (2048,)
    q = torch.randn(*rows, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(*rows, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    torch.autograd.grad(call(q, k, v), (q, k, v), dout)  # plans, compiles, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(call(q, k, v), (q, k, v), dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(grad).all() for grad in grads)
