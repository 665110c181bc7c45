"""Ring attention on every rank of a torchrun launch, checked against single-device attention.

    torchrun --standalone --nproc-per-node 2 examples/ring_attention_demo.py

CPU ranks talk over gloo, GPU ranks over NCCL. Each rank builds the same full q, k, v, keeps its
zigzag shard, runs causal GQA ring attention forward and backward, and the full results are
checked by FlashAttention's rule: against fp64 attention on the whole sequence, the ring's error
must be at most twice that of torch's scaled_dot_product_attention on one device in the same
dtype, plus a small atol. The demo exits 1 if any of out, dq, dk, dv fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fa4_cp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32

    torch.manual_seed(0)  # the same full tensors on every rank
    shape = (1, args.seq_len)
    q = torch.randn(*shape, args.heads, args.head_dim, device=device, dtype=dtype)
    k = torch.randn(*shape, args.kv_heads, args.head_dim, device=device, dtype=dtype)
    v = torch.randn(*shape, args.kv_heads, args.head_dim, device=device, dtype=dtype)
    dout = torch.randn_like(q)

    q_local, k_local, v_local = (fa4_cp.shard(t).requires_grad_() for t in (q, k, v))
    out_local = fa4_cp.ring_attention(q_local, k_local, v_local, causal=True)
    out_local.backward(fa4_cp.shard(dout))
    ring = [fa4_cp.unshard(t) for t in (out_local.detach(), q_local.grad, k_local.grad, v_local.grad)]

    truth = single_device(q, k, v, dout, torch.float64)
    baseline = single_device(q, k, v, dout, dtype)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    failed = []
    if rank == 0:
        print(f"ring attention over {world} ranks, {args.seq_len} tokens, {args.heads}:{args.kv_heads} heads, {dtype}")
    for name, mine, theirs, base in zip(("out", "dq", "dk", "dv"), ring, truth, baseline):
        error, bound = max_error(mine, theirs), 2 * max_error(base, theirs) + atol
        failed += [name] if not error <= bound else []
        if rank == 0:
            print(f"  {name}: max |ring - fp64| = {error:.2e}, bound {bound:.2e} (2 x one device's {max_error(base, theirs):.2e} + {atol:g})")
    dist.destroy_process_group()
    if failed:
        print(f"rank {rank}: FAILED: {', '.join(failed)} beyond the bound", file=sys.stderr)
        sys.exit(1)


def single_device(q, k, v, dout, dtype):
    """out, dq, dk, dv of SDPA on the whole sequence in `dtype`."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True, enable_gqa=True).transpose(1, 2)
    out.backward(dout.to(dtype))
    return out.detach(), *(t.grad for t in leaves)


def max_error(result: torch.Tensor, truth: torch.Tensor) -> float:
    error = (result.double() - truth.double()).abs().max().item()
    return error if error == error else float("inf")  # NaN never passes


if __name__ == "__main__":
    main()
