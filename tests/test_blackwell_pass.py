"""The Blackwell backward pass's host side, on the CPU: which calls take the accumulating kernel,
and what each launch is given (backward_pass_sm100.py). The kernels themselves are stood in for
(they compile in tests/test_kernel_compile.py and run only on a Blackwell GPU), so nothing here is
a numerical check."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flash_attn.cute")

import fa4_cp  # noqa: E402
from fa4_cp import SimulatedRing  # noqa: E402
from fa4_cp.kernels.fa4 import backend, backward_pass_sm100, passes_sm100, q_sides, tiled_accumulator  # noqa: E402

DOCUMENTS = [300, 400, 324]


@pytest.fixture
def blackwell(monkeypatch) -> dict[str, list]:
    """A CPU that answers as a Blackwell GPU, its kernels recording their arguments."""
    calls: dict[str, list] = {"launch": [], "preprocess": [], "postprocess": []}
    monkeypatch.setattr(backend, "fa4_arch", lambda device: 10)
    monkeypatch.setattr(backward_pass_sm100, "backward_kernel_sm100", lambda *key: lambda *args: calls["launch"].append((key, args)))
    monkeypatch.setattr(q_sides, "_bwd_preprocess", lambda *args, **kwargs: calls["preprocess"].append(args))
    monkeypatch.setattr(tiled_accumulator, "_bwd_postprocess_convert", lambda *args, **kwargs: calls["postprocess"].append(args))
    monkeypatch.setattr(backward_pass_sm100, "tile_order", lambda geometry, arch, device: torch.arange(geometry.tile * geometry.head_dim))

    def forward(q, k, v, out=None, lse=None, **kwargs):  # upstream's forward: shapes only
        lse_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3])
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype) if out is None else out, torch.zeros(lse_shape) if lse is None else lse

    monkeypatch.setattr(passes_sm100, "_flash_attn_fwd", forward)
    monkeypatch.setattr(passes_sm100, "merge_partials_cuda", lambda *args: None)
    return calls


def test_the_accumulating_pass_takes_the_calls_its_kernel_runs(blackwell):
    q, out, dout = (torch.zeros(1, 8, 4, 128, dtype=torch.bfloat16) for _ in range(3))
    lse = torch.zeros(1, 4, 8)

    def pass_for(q, dout, deterministic=False):
        return type(backend.FA4Backend().backward(q, out, lse, dout, None, softmax_scale=1.0, deterministic=deterministic)).__name__

    assert pass_for(q, dout) == pass_for(q, dout, deterministic=True) == "Sm100BackwardPass"
    wide = torch.zeros(1, 8, 4, 256, dtype=torch.bfloat16)
    assert pass_for(wide, wide) == "UpstreamBackwardPass"  # upstream's 64-row KV tiles at 256
    mla_q, mla_dout = torch.zeros(1, 8, 4, 192, dtype=torch.bfloat16), torch.zeros(1, 8, 4, 128, dtype=torch.bfloat16)
    assert pass_for(mla_q, mla_dout) == "Sm100BackwardPass"


def _ring_call(group, varlen: bool, heads=(8, 2), deterministic: bool = False):
    h, h_kv = heads
    if varlen:
        rows = fa4_cp.Sharding.documents(DOCUMENTS, group.world_size, "balanced").local_len
        q = torch.randn(rows, h, 128, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(rows, h_kv, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        cu_seqlens = torch.tensor([0, *DOCUMENTS], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = fa4_cp.ring_attention_varlen(q, k, v, cu_seqlens, causal=True, backend="fa4", group=group, deterministic=deterministic)
    else:
        q = torch.randn(1, 512, h, 128, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, 512, h_kv, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out = fa4_cp.ring_attention(q, k, v, causal=True, backend="fa4", group=group, deterministic=deterministic)
    out.float().sum().backward()
    return q, k


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_each_step_launches_one_kernel_into_fp32_dkv_rows_and_dq_reads_back_once(blackwell, world, varlen):
    shapes = SimulatedRing(world).run(lambda group: tuple(t.shape for t in _ring_call(group, varlen)))
    assert blackwell["launch"]
    for key, args in blackwell["launch"]:
        dtype, head_dim, head_dim_v, q_heads_per_kv_head, _window, launched_varlen, softcap, deterministic = key
        assert (dtype, head_dim, head_dim_v, q_heads_per_kv_head, launched_varlen, softcap) == (torch.bfloat16, 128, 128, 4, varlen, None)
        assert not deterministic and args[16:19] == (None, None, None)
        q, k, v, dout, lse_log2, dpsum, dq_accum, dk, dv = args[:9]
        assert dk.dtype == dv.dtype == dq_accum.dtype == torch.float32 and dk.shape == k.shape and dv.shape == v.shape
        assert dk.stride(-1) == 1 and dk.shape[-2] * 4 == q.shape[-2]
        assert dq_accum.shape[-1] % (128 * 128) == 0  # whole tiles of (tile rows x head_dim)
    # every rank reads dq back once, through upstream's postprocess where one accumulator holds it
    assert len(blackwell["postprocess"]) <= world
    for q_shape, k_shape in shapes:
        assert q_shape[-2:] == (8, 128) and k_shape[-2:] == (2, 128)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_a_deterministic_launch_gets_zeroed_turn_counters_for_every_tile(blackwell, varlen):
    SimulatedRing(2).run(lambda group: _ring_call(group, varlen, deterministic=True))
    for key, args in blackwell["launch"]:
        assert key[-1] is True
        q, k = args[0], args[1]
        dq_turns, dk_turns, dv_turns = args[16:19]
        lead = dq_turns.shape[:-3]
        assert all(t.dtype == torch.int32 and not t.any() for t in (dq_turns, dk_turns, dv_turns))
        # dq: a counter per q tile and CTA of a pair (head_dim 128 runs on pairs); dK/dV: per KV tile of
        # a whole pair, per warpgroup
        assert dq_turns.shape == (*lead, q.shape[-2], -(-q.shape[-3] // 128), 2)
        assert dk_turns.shape == dv_turns.shape == (*lead, k.shape[-2], -(-k.shape[-3] // 256) * 2, 2)
        assert lead == ((len(args[12]),) if varlen else q.shape[:1])
