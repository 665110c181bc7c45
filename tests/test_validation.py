"""Bad input: a ValueError naming the argument, raised before any communication.

The calls run on a 2-rank simulated ring whose transport fails the test if it is ever used.
"""

import pytest
import torch

import fa4_cp
from fa4_cp.parallel import transport as transport_module
from fa4_cp.parallel.simulated import SimulatedGroup, SimulatedRing


class NoCommunication:
    def __init__(self, group):
        self.rank, self.world_size = group.rank, group.world_size

    def shift(self, *args, **kwargs):
        raise AssertionError("communication before the arguments were checked")

    all_gather = shift


@pytest.fixture
def group(monkeypatch) -> SimulatedGroup:
    monkeypatch.setattr("fa4_cp.parallel.simulated.SimulatedTransport", NoCommunication)
    assert transport_module.resolve_transport(SimulatedRing(2).group(0)).__class__ is NoCommunication
    return SimulatedRing(2).group(0)


def qkv(batch=1, seq=8, heads=4, kv_heads=2, dim=16, dtype=torch.float32):
    return (
        torch.randn(batch, seq, heads, dim, dtype=dtype),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype),
    )


def raises(argument: str, expected: str):
    return pytest.raises(ValueError, match=rf"^{argument}: .*{expected}")


def test_wrong_ndim(group):
    q, k, v = qkv()
    with raises("q", "expected 4 dims"):
        fa4_cp.ring_attention(q[0], k, v, group=group)
    with raises("k", "expected 3 dims"):
        fa4_cp.ring_attention_varlen(q[0], k, v[0], torch.tensor([0, 16], dtype=torch.int32), group=group)


def test_wrong_shape(group):
    q, k, v = qkv()
    with raises("v", "expected the shape of k"):
        fa4_cp.ring_attention(q, k, v[..., :8], group=group)
    with raises("k", "expected the leading dims of q"):
        fa4_cp.ring_attention(q, k[:, :4], v[:, :4], group=group)
    with raises("k", "expected the head_dim of q"):
        fa4_cp.ring_attention(q[..., :8], k, v, group=group)
    with raises("q", "expected no empty dim"):
        fa4_cp.ring_attention(q[:, :0], k[:, :0], v[:, :0], group=group)


def test_wrong_dtype(group):
    q, k, v = qkv()
    with raises("k", "expected the dtype of q"):
        fa4_cp.ring_attention(q, k.double(), v, group=group)
    with raises("q", "expected dtype in"):
        fa4_cp.ring_attention(q.int(), k.int(), v.int(), group=group)


def test_wrong_device(group):
    q, k, v = qkv()
    with raises("v", "expected the device of q"):
        fa4_cp.ring_attention(q, k, v.to("meta"), group=group)


def test_kv_heads_must_divide_q_heads(group):
    q, k, v = qkv(heads=4, kv_heads=3)
    with raises("k", "head count dividing"):
        fa4_cp.ring_attention(q, k, v, group=group)


def test_local_length_must_fit_the_layout(group):
    q, k, v = qkv(seq=7)
    with raises("q", "divisible by 4, so a local length divisible by 2; got 7"):
        fa4_cp.ring_attention(q, k, v, group=group)
    with raises("layout", "expected one of"):
        fa4_cp.ring_attention(*qkv(), group=group, layout="striped")


def test_cu_seqlens_must_be_int32_monotone_and_end_at_the_total(group):
    q, k, v = (t[0] for t in qkv(seq=16))
    with raises("cu_seqlens", "1-D int32"):
        fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 30]), group=group)
    with raises("cu_seqlens", "non-decreasing"):
        fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 20, 12, 30], dtype=torch.int32), group=group)
    with raises("cu_seqlens", r"expected \[0, end of document 1"):
        fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([3, 30], dtype=torch.int32), group=group)
    with raises("cu_seqlens", "take 8 local rows per rank .* but q has 16"):
        fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 16], dtype=torch.int32), group=group)


def test_window_on_a_layout_that_cannot_honour_it(group):
    q, k, v = (t[0] for t in qkv(seq=8))
    with raises("window_size", "not supported with varlen documents"):
        fa4_cp.ring_attention_varlen(q, k, v, torch.tensor([0, 16], dtype=torch.int32), group=group, window_size=(4, 0))


def test_malformed_mask_and_scale(group):
    q, k, v = qkv()
    with raises("window_size", r"ints >= -1"):
        fa4_cp.ring_attention(q, k, v, group=group, window_size=(-3, 0))
    with raises("window_size", "right must be -1 or 0"):
        fa4_cp.ring_attention(q, k, v, group=group, causal=True, window_size=(4, 2))
    with raises("causal", "expected a bool"):
        fa4_cp.ring_attention(q, k, v, group=group, causal="yes")
    with raises("softmax_scale", "positive finite"):
        fa4_cp.ring_attention(q, k, v, group=group, softmax_scale=float("nan"))
    with raises("backend", "expected one of"):
        fa4_cp.ring_attention(q, k, v, group=group, backend="cudnn")


def test_group_must_be_a_known_kind():
    q, k, v = qkv()
    with raises("group", "expected None, a ProcessGroup"):
        fa4_cp.ring_attention(q, k, v, group="cp")


def test_unknown_transport_is_refused_before_any_communication():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"transport: expected one of \('auto', 'nccl', 'copy_engine'\), got 'shm'"):
        fa4_cp.ring_attention(q, q, q, transport="shm")
