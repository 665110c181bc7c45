"""What the ring hands the kernels. A kernel loads whole tiles of K and V and masks the scores it
must not use, so every K/V row it may load must be finite: a masked zero times a NaN is NaN. That
is every row of a dense block, and of a varlen block the rows up to its last sequence's end plus
one tile. The reference backend reads only the rows it needs, so it is wrapped here to check what
FA4 would load."""

import collections
import dataclasses

import pytest
import torch

from fa4_cp import SimulatedRing
from fa4_cp.kernels import reference
from fa4_cp.runtime.travelling import KV_CHANNEL
from oracle import CASES_BY_NAME, make_inputs, ring_results_for_rank


LARGEST_KV_TILE = 144
"""FA4's K/V tiles: at most 144 rows (the sm90 forward at head_dim 96, no mask), 128 in the backward."""


class NonFiniteRows(list):
    def check(self, where: str, k: torch.Tensor, v: torch.Tensor, varlen) -> None:
        if varlen is not None:
            last = int((varlen.cu_seqlens_k[:-1] + varlen.seqused_k).max())
            k, v = (t.narrow(-3, 0, min(t.shape[-3], last + LARGEST_KV_TILE)) for t in (k, v))
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            self.append((where, tuple(k.shape), int((~torch.isfinite(v)).any(-1).any(-1).sum())))


@pytest.fixture
def kernel_inputs(monkeypatch) -> NonFiniteRows:
    found = NonFiniteRows()
    forward_step, backward_step = reference.ReferenceForwardPass.step, reference.ReferenceBackwardPass.step

    def checked_forward(self, q, k, v, *args, **kwargs):
        found.check("forward", k, v, kwargs.get("varlen"))
        return forward_step(self, q, k, v, *args, **kwargs)

    def checked_backward(self, k, v, *args, **kwargs):
        found.check("backward", k, v, kwargs.get("varlen"))
        return backward_step(self, k, v, *args, **kwargs)

    monkeypatch.setattr(reference.ReferenceForwardPass, "step", checked_forward)
    monkeypatch.setattr(reference.ReferenceBackwardPass, "step", checked_backward)
    return found


@pytest.mark.usefixtures("poisoned_memory")
@pytest.mark.parametrize("world_size", [8, 72])
@pytest.mark.parametrize("name", ["balanced_causal", "balanced_huge_gqa", "softcap_sinks_balanced_gqa", "varlen_causal"])
def test_kernels_are_handed_finite_kv_rows(name, world_size, kernel_inputs):
    """Under poisoned memory (every torch.empty NaN), with the travelling buffers longer than some
    ranks' travelling rows (spread documents of unequal spans)."""
    case = dataclasses.replace(CASES_BY_NAME[name], head_dim=16)
    inputs = make_inputs(case, world_size, torch.bfloat16, seed=world_size)
    SimulatedRing(world_size).run(lambda group: ring_results_for_rank(case, world_size, inputs, group, group.rank, backend="reference"))
    assert not kernel_inputs, f"{len(kernel_inputs)} block steps got non-finite K/V rows, e.g. {kernel_inputs[:3]}"


FILLS = ("fill_", "zero_", "index_fill_", "masked_fill_")


@pytest.fixture
def fills(monkeypatch) -> collections.Counter:
    """In-place fills made from Python (the ring's own code), counted by their storage address: a
    dispatch mode would see the ring's custom op, not what runs inside it."""
    found: collections.Counter = collections.Counter()
    for name in FILLS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, method=method, **kwargs):
            found[self.untyped_storage().data_ptr()] += 1
            return method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return found


@pytest.mark.parametrize("name", ["balanced_huge_gqa", "varlen_causal"])  # KV travels in a prefix / whole
def test_a_warm_call_fills_nothing_in_the_travelling_kv(name, fills):
    """The pool zeroes an arena once; a later call leaves the rows past what it copies and what
    lands as they are (finite, above), where each hop zeroed the kernels' overhang until session 31."""
    world_size = 8
    case = dataclasses.replace(CASES_BY_NAME[name], head_dim=16)
    inputs = make_inputs(case, world_size, torch.bfloat16, seed=world_size)

    def call(group):
        ring_results_for_rank(case, world_size, inputs, group, group.rank, backend="reference")
        return group.transport("auto", torch.device("cpu"))._pool.arena(KV_CHANNEL).untyped_storage().data_ptr()

    ring = SimulatedRing(world_size)
    arenas = ring.run(call)
    assert all(fills[arena] == 1 for arena in arenas)  # zeroed when made
    fills.clear()
    assert ring.run(call) == arenas and not any(fills[arena] for arena in arenas)
