"""deterministic=True: validated before any communication, agreed across ranks, and handed to the
backend's backward on every path (ring, varlen, 2-D mesh, the integrations, launch/). The kernels'
own fixed-order sums are tested on the GPU (tests/gpu/test_fa4_deterministic.py)."""

import pytest
import torch

import fa4_cp
from fa4_cp import SimulatedMesh, SimulatedRing
from fa4_cp.kernels import ReferenceBackend


class RecordingBackend(ReferenceBackend):
    """The reference, noting the `deterministic` each backward pass was made with."""

    def __init__(self):
        self.seen: list[bool] = []

    def backward(self, *args, deterministic: bool = False, **kwargs):
        self.seen.append(deterministic)
        return super().backward(*args, deterministic=deterministic, **kwargs)


def _grads(group, backend, deterministic, varlen: bool = False, **options):
    torch.manual_seed(0)
    if varlen:
        q, k, v = (torch.randn(10, 4, 8, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        out = fa4_cp.ring_attention_varlen(q, k, v, cu, group=group, causal=True, layout="zigzag", backend=backend, deterministic=deterministic)
    else:
        q, k, v = (torch.randn(1, 8, 4, 8, requires_grad=True) for _ in range(3))
        out = fa4_cp.ring_attention(q, k, v, group=group, causal=True, backend=backend, deterministic=deterministic, **options)
    out.sum().backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_the_flag_reaches_the_backward_and_repeats_bitwise(varlen):
    backend = RecordingBackend()
    first = SimulatedRing(2).run(lambda group: _grads(group, backend, True, varlen))
    again = SimulatedRing(2).run(lambda group: _grads(group, backend, True, varlen))
    assert backend.seen == [True] * 4
    assert all(torch.equal(a, b) for ranks in zip(first, again) for a, b in zip(*ranks))
    SimulatedRing(2).run(lambda group: _grads(group, backend, False, varlen))
    assert backend.seen[-2:] == [False, False]


def test_the_flag_reaches_the_ring_of_a_two_dimensional_mesh():
    backend = RecordingBackend()
    SimulatedMesh(2, 2).run(lambda group: _grads(group, backend, True))
    assert backend.seen == [True] * 4


def test_head_chunks_keep_the_flag_and_repeat_bitwise():
    backend = RecordingBackend()

    def run():
        return SimulatedMesh(2, 2).run(lambda group: _grads(group, backend, True, ulysses_chunks=2))

    first, again = run(), run()
    assert backend.seen == [True] * 16  # 4 ranks x 2 chunks, twice
    assert all(torch.equal(a, b) for ranks in zip(first, again) for a, b in zip(*ranks))


def test_a_flag_that_is_not_a_bool_is_refused_before_any_communication():
    ring = SimulatedRing(2)
    with pytest.raises(ValueError, match="deterministic: expected a bool, got 1"):
        _grads(ring.group(0), "reference", 1)
    assert ring.collectives[0] == 0


def test_ranks_that_disagree_raise_on_every_rank():
    def call(group):
        try:
            _grads(group, "reference", group.rank == 0)
        except ValueError as error:
            return str(error)
        return "returned"

    messages = SimulatedRing(2).run(call)
    for message in messages:
        assert "differs across the ranks" in message and "deterministic (ranks 0: True; ranks 1: False)" in message, message


def test_transformers_passes_the_flag(monkeypatch):
    pytest.importorskip("transformers")
    from fa4_cp.integrations import transformers as integration

    seen = {}

    def recording(q, k, v, **options):
        seen.update(options)
        return q

    monkeypatch.setattr(integration, "ring_attention", recording)
    name = integration.register_ring_attention(name="fa4_cp_ring_deterministic_test", deterministic=True)
    module = torch.nn.Module()
    query = torch.randn(1, 2, 8, 4)
    integration._entry(name)(module, query, query, query, None)
    assert seen["deterministic"] is True and seen["ulysses_chunks"] == 1
    # the accelerate plugin rebinds its attention to each batch's split and head chunks
    integration.rebind_ring(name, None, ulysses_chunks=4)
    integration._entry(name)(module, query, query, query, None)
    assert seen["ulysses_chunks"] == 4 and seen["deterministic"] is True
    with pytest.raises(ValueError, match="deterministic: expected a bool"):
        integration.register_ring_attention(name="fa4_cp_ring_deterministic_bad", deterministic="yes")


def test_launch_takes_the_flag():
    from launch.config import parse_config

    assert parse_config(["--deterministic"]).deterministic is True
    assert parse_config([]).deterministic is False
