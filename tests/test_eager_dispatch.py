"""An eager call runs the op pair's bodies under a plain autograd.Function (ops.EagerRingAttention),
without torch's custom-op layers; any torch layer that must see the op (torch.compile, a dispatch
or function mode, functorch, a tensor subclass, meta tensors) gets the op. Both ways give bitwise
the same results and gradients, and neither takes a second derivative."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fa4_cp
from fa4_cp import SimulatedRing, attention, ops
from fa4_cp.comm.simulated import SimulatedMesh
from fa4_cp.plan.mesh_sharding import mesh_sharding

DOCUMENTS = [5, 17, 2, 8]


def _inputs(rank: int, varlen: bool, heads: int = 4, kv_heads: int = 2, ring: int = 2, ulysses: int = 1):
    generator = torch.Generator().manual_seed(100 + rank)
    rows = mesh_sharding(fa4_cp.Sharding.documents(DOCUMENTS, ring, "zigzag"), ulysses).local_len
    lead = (rows,) if varlen else (1, 16)
    q = torch.randn(*lead, heads, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(*lead, kv_heads, 8, generator=generator, requires_grad=True) for _ in range(2))
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(7), requires_grad=True)
    return q, k, v, sinks


def _results(group, rank: int, varlen: bool, ulysses: int) -> tuple[str, list[torch.Tensor]]:
    q, k, v, sinks = _inputs(rank, varlen, ulysses=ulysses)
    options = dict(group=group, causal=True, sinks=sinks, backend="reference", return_lse=True)
    if varlen:
        cu_seqlens = torch.tensor([0, *DOCUMENTS], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out, lse = fa4_cp.ring_attention_varlen(q, k, v, cu_seqlens, layout="zigzag", **options)
    else:
        out, lse = fa4_cp.ring_attention(q, k, v, **options)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    gradients = torch.autograd.grad((out * weights).sum() + lse.sum(), (q, k, v, sinks))
    return type(out.grad_fn).__name__, [out.detach(), lse.detach(), *gradients]


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("mesh", [False, True], ids=["ring", "mesh_2x2"])
def test_eager_calls_skip_the_dispatcher_and_equal_the_op_bitwise(monkeypatch, varlen, mesh):
    def run():
        if mesh:
            return SimulatedMesh(2, 2).run(lambda group: _results(group, group.rank, varlen, ulysses=2))
        return SimulatedRing(2).run(lambda group: _results(group, group.rank, varlen, ulysses=1))

    eager = run()
    monkeypatch.setattr(attention, "runs_eager", lambda *tensors: False)
    through_op = run()
    for (eager_node, eager_values), (op_node, op_values) in zip(eager, through_op):
        assert eager_node == "EagerRingAttentionBackward"
        assert op_node != eager_node
        for a, b in zip(eager_values, op_values):
            assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_layers_that_must_see_the_op_get_it():
    q, k, v, sinks = _inputs(0, varlen=False)
    assert ops.runs_eager(q, k, v, None, sinks)
    assert ops.runs_eager(q.detach(), k, v, None, None)
    assert not ops.runs_eager(q.to("meta"), k.to("meta"), v.to("meta"), None, None)
    with FlopCounterMode(display=False):
        assert not ops.runs_eager(q, k, v, None, sinks)
    with torch.device("cpu"):  # a default device acts alike either way
        assert ops.runs_eager(q, k, v, None, sinks)
        with FlopCounterMode(display=False):
            assert not ops.runs_eager(q, k, v, None, sinks)
    with torch.overrides.TorchFunctionMode():
        assert not ops.runs_eager(q, k, v, None, sinks)
    seen = []
    torch.func.vmap(lambda x: seen.append(ops.runs_eager(x, k, v, None, None)) or x)(q)
    assert seen == [False]

    traced = []
    torch.jit.trace(lambda x: traced.append(ops.runs_eager(x, k, v, None, None)) or x * 2, q.detach(), check_trace=False)
    assert traced == [False]

    class Marked(torch.Tensor):
        pass

    assert not ops.runs_eager(q.as_subclass(Marked), k, v, None, None)


def test_a_call_under_a_dispatch_mode_runs_through_the_op():
    q, k, v, _ = _inputs(0, varlen=False)
    eager = fa4_cp.ring_attention(q, k, v, causal=True, backend="reference")
    with FlopCounterMode(display=False):
        seen = fa4_cp.ring_attention(q, k, v, causal=True, backend="reference")
    assert type(seen.grad_fn).__name__ != type(eager.grad_fn).__name__ == "EagerRingAttentionBackward"
    assert torch.equal(seen, eager)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "op"])
def test_a_second_derivative_is_refused_never_taken_as_zero(monkeypatch, eager):
    if not eager:
        monkeypatch.setattr(attention, "runs_eager", lambda *tensors: False)
    q, k, v, _ = _inputs(0, varlen=False)
    out = fa4_cp.ring_attention(q, k, v, causal=True, backend="reference")
    dq, dk = torch.autograd.grad(out.sum(), (q, k), create_graph=True)
    assert dq.requires_grad and dk.requires_grad
    with pytest.raises(RuntimeError, match="ring_attention"):
        torch.autograd.grad(dq.sum() + (q * q).sum(), (q,))
