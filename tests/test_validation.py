"""Bad input: a ValueError naming the argument, raised before any communication.

Every call runs on every rank of a 2-rank simulated ring, whose group counts the collectives each
rank takes part in (all-gathers, shifts, and the transport's set-up, which is collective as it
is between GPUs); a refused call must leave every count at 0.
"""

import warnings

import pytest
import torch

import fa4_cp
from fa4_cp import SimulatedRing


def qkv(batch=1, seq=8, heads=4, kv_heads=2, dim=16, dtype=torch.float32):
    return (
        torch.randn(batch, seq, heads, dim, dtype=dtype),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype),
    )


def refused(call, argument: str, expected: str) -> None:
    """`call(group)` raises ValueError("<argument>: ...<expected>...") on every rank, before any collective."""
    ring = SimulatedRing(2)
    with pytest.raises(ValueError, match=rf"^{argument}: .*{expected}"):
        ring.run(call)
    assert sum(ring.collectives.values()) == 0, f"communicated before refusing: {dict(ring.collectives)}"


def test_the_counting_group_sees_a_good_call_communicate():
    """The harness can fail: a call that passes its checks communicates."""
    q, k, v = qkv()
    ring = SimulatedRing(2)
    ring.run(lambda group: fa4_cp.ring_attention(q, k, v, group=group))
    assert all(ring.collectives[rank] > 0 for rank in range(2))


def test_wrong_ndim():
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q[0], k, v, group=g), "q", "expected 4 dims")
    refused(lambda g: fa4_cp.ring_attention_varlen(q[0], k, v[0], torch.tensor([0, 16], dtype=torch.int32), group=g), "k", "expected 3 dims")


def test_wrong_shape():
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k, v[:, :, :1], group=g), "v", "expected the shape of k")  # its own head_dim only may differ
    refused(lambda g: fa4_cp.ring_attention(q, k[:, :4], v[:, :4], group=g), "k", "expected the leading dims of q")
    refused(lambda g: fa4_cp.ring_attention(q[..., :8], k, v, group=g), "k", "expected the head_dim of q")
    refused(lambda g: fa4_cp.ring_attention(q[:, :0], k[:, :0], v[:, :0], group=g), "q", "expected no empty dim")


def test_wrong_dtype_and_device():
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k.double(), v, group=g), "k", "expected the dtype of q")
    refused(lambda g: fa4_cp.ring_attention(q.int(), k.int(), v.int(), group=g), "q", "expected dtype in")
    refused(lambda g: fa4_cp.ring_attention(q, k, v.to("meta"), group=g), "v", "expected the device of q")
    refused(lambda g: fa4_cp.ring_attention(q, "k", v, group=g), "k", "expected a torch.Tensor")


def test_kv_heads_must_divide_q_heads():
    q, k, v = qkv(heads=4, kv_heads=3)
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g), "k", "head count dividing")


def test_local_length_must_fit_the_layout():
    q, k, v = qkv(seq=7)
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g), "q", "divisible by 4, so a local length divisible by 2; got 7")
    refused(lambda g: fa4_cp.ring_attention(*qkv(), group=g, layout="striped"), "layout", "expected one of")


def test_cu_seqlens_must_be_int32_monotone_and_end_at_the_total():
    q, k, v = (t[0] for t in qkv(seq=16))
    refused(lambda g: fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 30]), group=g), "cu_seqlens", "1-D int32")
    refused(lambda g: fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 20, 12, 30], dtype=torch.int32), group=g), "cu_seqlens", "non-decreasing")
    refused(lambda g: fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([3, 30], dtype=torch.int32), group=g), "cu_seqlens", r"expected \[0, end of document 1")
    refused(lambda g: fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 16], dtype=torch.int32), group=g, layout="zigzag"), "cu_seqlens", "take 8 local rows per rank under the zigzag layout .* but q has 16")
    refused(lambda g: fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 9, 30], dtype=torch.int32), group=g), "cu_seqlens", "take 21 local rows per rank under the balanced layout .* but q has 16")
    refused(lambda g: fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 16], dtype=torch.int32), group=g, layout="striped"), "layout", "for packed documents")


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan"), True, "30"], ids=repr)
def test_softcap_must_be_positive_and_finite(softcap):
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, softcap=softcap), "softcap", "positive finite")


def test_sinks_need_one_logit_per_q_head_of_a_float_dtype_on_q_device():
    q, k, v = qkv(heads=4)
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, sinks=torch.zeros(2)), "sinks", r"expected shape \(4,\), one logit per q head, got \(2,\)")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, sinks=torch.zeros(1, 4)), "sinks", r"expected shape \(4,\)")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, sinks=torch.zeros(4, dtype=torch.int64)), "sinks", "expected dtype in")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, sinks=torch.zeros(4, device="meta")), "sinks", "expected the device of q")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, sinks=[0.0] * 4), "sinks", "expected a tensor")
    varlen = [t[0] for t in (q, k, v)]
    cu = torch.tensor([0, 16], dtype=torch.int32)
    refused(lambda g: fa4_cp.ring_attention_varlen(*varlen, cu, group=g, layout="zigzag", sinks=torch.zeros(3)), "sinks", r"expected shape \(4,\)")


def test_malformed_mask_flags_and_backend():
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, window_size=(-3, 0)), "window_size", r"ints >= -1")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, causal=True, window_size=(4, 2)), "window_size", "right must be -1 or 0")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, causal="yes"), "causal", "expected a bool")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, return_lse=1), "return_lse", "expected a bool")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, backend="cudnn"), "backend", "expected one of")
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, transport="shm"), "transport", r"expected one of \('auto', 'nccl', 'copy_engine'\)")


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("-inf"), float("nan"), True, "0.1"], ids=repr)
def test_softmax_scale_must_be_positive_and_finite(scale):
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, softmax_scale=scale), "softmax_scale", "positive finite")


def test_the_fa4_backend_says_why_it_cannot_run():
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g, backend="fa4"), "backend 'fa4'", "")


def test_group_must_be_a_known_kind():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="group: expected None, a ProcessGroup"):
        fa4_cp.ring_attention(q, k, v, group="cp")


def test_transport_from_the_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("FA4_CP_TRANSPORT", "shm")
    q, k, v = qkv()
    refused(lambda g: fa4_cp.ring_attention(q, k, v, group=g), "transport", "FA4_CP_TRANSPORT")


def test_auto_warns_once_with_the_reason_when_it_cannot_pick_fa4(monkeypatch):
    """16-bit CUDA inputs (fake tensors: no GPU needed) without the GPU stack fall back to the
    reference with one warning naming why; the second call is silent."""
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fa4_cp import kernels

    import fa4_cp.kernels.fa4 as fa4_package

    monkeypatch.setitem(sys.modules, "fa4_cp.kernels.fa4.backend", None)  # the import fails,
    monkeypatch.delattr(fa4_package, "backend", raising=False)  # even where an earlier test imported it
    monkeypatch.setattr(kernels, "_warned", set())
    with FakeTensorMode():
        q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernels.get_backend("auto", q)
        second = kernels.get_backend(None, q)
    assert first.name == second.name == "reference"
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "O(S^2) PyTorch reference on 16-bit CUDA inputs: the GPU stack is not importable" in str(caught[0].message)
    with pytest.raises(ValueError, match="backend 'fa4': the GPU stack is not importable"):
        kernels.get_backend("fa4", q)


def test_a_rank_that_caught_its_own_error_and_carried_on_is_caught_at_its_next_call():
    """Rank 1's bad call is refused before any communication; it catches the error and calls again,
    while rank 0 makes its first call: without call numbers the two would pair."""
    q, k, v = qkv()

    def call(group):
        if group.rank == 1:
            with pytest.raises(ValueError, match="window_size"):
                fa4_cp.ring_attention(q, k, v, group=group, causal=True, window_size=(4, 2))
        try:
            fa4_cp.ring_attention(q, k, v, group=group, causal=True)
        except ValueError as error:
            return str(error)
        return "returned"

    for message in SimulatedRing(2).run(call):
        assert "differs across the ranks" in message and "call number on this group (ranks 0: 1; ranks 1: 2)" in message, message


def test_ranks_whose_sinks_values_differ_raise_on_every_rank():
    q, k, v = qkv()

    def call(group):
        try:
            fa4_cp.ring_attention(q, k, v, group=group, causal=True, sinks=torch.full((4,), float(group.rank)))
        except ValueError as error:
            return str(error)
        return "returned"

    for message in SimulatedRing(2).run(call):
        assert "differs across the ranks" in message and "sinks values (ranks 0: [0.0, 0.0, 0.0, 0.0]" in message, message
    same = SimulatedRing(2).run(lambda group: fa4_cp.ring_attention(q, k, v, group=group, causal=True, sinks=torch.ones(4)))
    assert all(out.shape == q.shape for out in same)  # equal sinks pass
