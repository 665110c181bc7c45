"""Ring attention on every rank of a torchrun launch, checked against single-device attention.

    torchrun --standalone --nproc-per-node 2 examples/ring_attention_demo.py

CPU ranks talk over gloo, GPU ranks over NCCL. Each rank builds the same full q, k, v, keeps its
zigzag shard, runs causal GQA ring attention forward and backward, and the full results are
compared with torch's scaled_dot_product_attention on the whole sequence in fp32.
"""

from __future__ import annotations

import argparse
import os

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

    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(
        q32.transpose(1, 2), k32.transpose(1, 2), v32.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    expected.backward(dout.float())
    if rank == 0:
        print(f"ring attention over {world} ranks, {args.seq_len} tokens, {args.heads}:{args.kv_heads} heads, {dtype}")
        for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ring, (expected, q32.grad, k32.grad, v32.grad)):
            print(f"  {name}: max |ring - single device| = {(mine.float() - theirs).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
