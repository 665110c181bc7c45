"""The cross-rank check compares digests: every field of RingCall must change its digest, or ranks
that differ in that field would run together silently (a scale mismatch, say)."""

import dataclasses

import torch

from fa4_cp.call import RingCall, prepared_call
from fa4_cp.handles import options_handle, options_of
from fa4_cp.kernels import BandMask
from fa4_cp.plan.sharding import Sharding


def base_call() -> RingCall:
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    options = options_of(options_handle(True, (-1, -1), None, None, "zigzag", "reference", "auto", False))
    return prepared_call(q, k, k, None, None, options, ring_size=2, backward=True).call


CHANGED = {
    "varlen": True,
    "q_shape": (1, 8, 8, 16),
    "kv_shape": (1, 8, 4, 16),
    "v_head_dim": 8,
    "dtype": torch.bfloat16,
    "sharding": Sharding.dense(16, 2, "contiguous"),
    "mask": BandMask(lo=-4, hi=0),
    "softmax_scale": 0.25 * (1 + 2**-20),
    "softcap": 30.0,
    "sinks": (4,),
    "backend": "fa4",
    "transport": "nccl",
    "ulysses": 2,
    "deterministic": True,
    "ulysses_chunks": 2,
}


def test_every_field_of_a_call_changes_its_digest():
    call = base_call()
    assert set(CHANGED) == {field.name for field in dataclasses.fields(RingCall)}, "a new field needs a row here"
    for name, value in CHANGED.items():
        assert getattr(call, name) != value, name
        changed = dataclasses.replace(call, **{name: value})
        assert changed.digest != call.digest, f"{name}: changing it leaves the digest as it was"
        assert changed.describe() != call.describe(), f"{name}: a mismatch in it would not be named"
