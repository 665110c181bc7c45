"""A Llama-style decoder: RMSNorm, RoPE on global token positions, SwiGLU, GQA; attention is
fa4_cp ring attention over the context-parallel group.

Each rank holds its zigzag shard of the sequence; RoPE reads the tokens' global positions, so the
model computes exactly what the unsharded model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

import fa4_cp
from config import ModelConfig
from loss import chunked_cross_entropy_sum


class RotaryEmbedding(nn.Module):
    """cos and sin of each token's angles, once per forward for every layer. The angles are
    computed in fp64: at a million tokens, position x frequency in fp32 would be off by up to
    0.06 rad (the fp32 spacing near 1e6)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (b, s) -> cos, sin (b, s, 1, d/2) in fp32."""
        angles = rearrange(positions.double()[..., None] * self.inv_freq, "b s d -> b s 1 d")
        return torch.cos(angles).float(), torch.sin(angles).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, s, h, d) rotated pairwise (first half, second half), in fp32."""
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """GQA; v's head_dim may be narrower than q's and k's (an MLA-like layer's shapes)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim, self.v_head_dim = config.head_dim, config.value_head_dim
        self.kv_split = [config.n_kv_heads * self.head_dim, config.n_kv_heads * self.v_head_dim]
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.d_model, sum(self.kv_split), bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.v_head_dim, config.d_model, bias=False)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """x (b, s, d_model) -> rotated q, rotated k (b, s, h, head_dim) and v (b, s, h_kv, v_head_dim)."""
        q = rearrange(self.q_proj(x), "b s (h d) -> b s h d", d=self.head_dim)
        k, v = self.kv_proj(x).split(self.kv_split, -1)
        k, v = rearrange(k, "b s (h d) -> b s h d", d=self.head_dim), rearrange(v, "b s (h d) -> b s h d", d=self.v_head_dim)
        return rotate(q, *rope), rotate(k, *rope), v.contiguous()


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer. With `recompute_around_attention` set, everything but ring attention
    runs under activation checkpointing: backward recomputes the projections, norms and FFN
    but keeps the attention's saved q, k, v and output, so attention runs forward only once."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = FeedForward(config)
        self.recompute_around_attention = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ring: dict, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._run(self._attention_inputs, x, rope)
        if cu_seqlens is None:
            out = fa4_cp.ring_attention(q, k, v, causal=True, **ring)
        else:  # packed documents, batch 1: attention stays within each
            out = fa4_cp.ring_attention_varlen(q[0], k[0], v[0], cu_seqlens, causal=True, **ring)[None]
        return self._run(self._after_attention, x, out)

    def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        if self.recompute_around_attention:
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def _attention_inputs(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.attention.project(self.attention_norm(x), rope)

    def _after_attention(self, x: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.o_proj(rearrange(attention_out, "b s h d -> b s (h d)"))
        return x + self.ffn(self.ffn_norm(x))


class Decoder(nn.Module):
    """`forward` returns the sum of the local tokens' losses: the output projection runs inside
    the chunked loss (loss.py), within the root module's forward so FSDP has its weight gathered,
    and [S, V] logits never exist."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.ring: dict = {}  # ring_attention's group/backend/transport/deterministic, set by the trainer

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, loss_chunk: int,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cu_seqlens`: the global int32 boundaries of packed documents (batch 1), as sharded."""
        x = self.embedding(input_ids)
        rope = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, rope, self.ring, cu_seqlens)
        return chunked_cross_entropy_sum(self.norm(x), self.output.weight, labels, loss_chunk)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init (same on every rank, before sharding), as torchtitan's Llama: token
        embeddings N(0, 1), output projection N(0, 1/d_model), other matrices N(0, 0.02), the last
        projection of each residual branch scaled by 1 / sqrt(2 * n_layers). Embeddings at 0.02
        let the attention branch (near-uniform at init: about the same vector for every token)
        dominate the residual stream, and the loss rose over Adam's first steps at d_model 2048."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / (2 * self.config.n_layers) ** 0.5
        for name, parameter in self.named_parameters():
            if parameter.ndim == 1:
                parameter.fill_(1.0)  # RMSNorm weights
                continue
            if name == "embedding.weight":
                std = 1.0
            elif name == "output.weight":
                std = self.config.d_model**-0.5
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down.weight")) else 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)

    def parameter_count(self, include_embedding: bool = True) -> int:
        count = sum(p.numel() for p in self.parameters())
        return count if include_embedding else count - self.embedding.weight.numel()
