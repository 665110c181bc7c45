"""A call descends once: each argument check runs once for a forward and its backward; a later
call of the same signature checks only its RingOptions at the entry point (call.py caches the
prepared call: tensors, documents, the backend's fit, the 2-D split)."""

from __future__ import annotations

import collections
import sys
import threading

import pytest
import torch

import fa4_cp
from fa4_cp import call, validation

CHECKS = ("check_devices", "check_mask", "check_softmax_scale", "check_softcap", "check_qkv", "check_sinks", "check_cu_seqlens")


@pytest.fixture
def counts(monkeypatch) -> collections.Counter:
    """How often each check runs, wherever fa4_cp imported it; an empty cache of validated calls."""
    counted: collections.Counter = collections.Counter()
    lock = threading.Lock()
    for name in CHECKS:
        original = getattr(validation, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            with lock:
                counted[_name] += 1
            return _original(*args, **kwargs)

        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("fa4_cp") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counting)
    monkeypatch.setattr(call, "_prepared", collections.OrderedDict())
    return counted


def _leaves(*shape, kv_heads=2):
    q = torch.randn(*shape, 4, 16, requires_grad=True)
    k, v = (torch.randn(*shape, kv_heads, 16, requires_grad=True) for _ in range(2))
    return q, k, v




@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_each_check_runs_once_for_a_forward_and_its_backward(counts, varlen):
    if varlen:
        q, k, v = _leaves(24)
        cu_seqlens = torch.tensor([0, 10, 24], dtype=torch.int32)

        def run():
            return fa4_cp.ring_attention_varlen(q, k, v, cu_seqlens, causal=True, backend="reference")
    else:
        q, k, v = _leaves(1, 16)

        def run():
            return fa4_cp.ring_attention(q, k, v, causal=True, backend="reference")

    run().sum().backward()
    expected = {name: 1 for name in CHECKS if name != "check_cu_seqlens" or varlen}
    assert dict(counts) == expected
    run().sum().backward()  # a later step of the same signature: the entry point's scalar checks only
    cached = {"check_qkv", "check_sinks", "check_cu_seqlens"}
    assert dict(counts) == {name: n if name in cached else 2 * n for name, n in expected.items()}


def test_the_2d_call_checks_once_and_its_backward_nothing(counts):
    """Before, a 2-D call checked q, k, v four times per rank: at the entry point, on the ring's
    stand-ins, in the ring's op, and again in the backward. Now each rank checks its options at
    the entry point, and the call (the real tensors, then the ring's) is prepared once for the
    process (its ranks share the cache); the backward checks nothing."""
    q, k, v = _leaves(1, 16)
    shards = [tuple(t.detach()[:, 8 * rank : 8 * rank + 8].clone().requires_grad_() for t in (q, k, v)) for rank in range(2)]

    def rank_call(group):
        q_, k_, v_ = shards[group.rank]
        fa4_cp.ring_attention(q_, k_, v_, group=group, causal=True, layout="contiguous", backend="reference").sum().backward()

    fa4_cp.SimulatedMesh(2, 1).run(rank_call)
    per_rank = {"check_devices", "check_mask", "check_softmax_scale", "check_softcap"}
    assert dict(counts) == {**{name: 2 for name in per_rank}, "check_qkv": 1, "check_sinks": 1}


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_a_backward_whose_call_the_cache_dropped_prepares_it_again(counts, heads):
    """The backward finds its forward's prepared call by dout's shape and the forward's head sizes;
    where the cache has dropped it meanwhile (more signatures than CACHED_CALLS), the backward
    prepares it again from stand-ins, with the same gradients."""
    q_heads, kv_heads = heads
    q = torch.randn(1, 16, q_heads, 16, requires_grad=True)
    k, v = (torch.randn(1, 16, kv_heads, 16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def grads(drop: bool) -> tuple[torch.Tensor, ...]:
        out = fa4_cp.ring_attention(q, k, v, causal=True, backend="reference")
        if drop:
            call._prepared.clear()
        return torch.autograd.grad(out, (q, k, v), dout)

    kept = grads(drop=False)
    assert counts["check_qkv"] == 1
    for expected, got in zip(kept, grads(drop=True), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert counts["check_qkv"] == 2  # the forward's prepared call was found; the dropped one was made again
