"""The schedule, checked by brute force: over all ranks and steps, every visible (query, key) pair of
the full sequence is computed exactly once and no other pair is; skipped steps hold nothing visible.
"""

import itertools

import pytest
import torch

from fa4_cp import Sharding
from fa4_cp.kernels import BandMask
from fa4_cp.kernels.reference import band_visibility
from fa4_cp.plan.rows import rank_plan
from fa4_cp.plan.schedule import band_interval, build_schedule
from fa4_cp.plan.span_rows import span_streams


def global_positions(sharding) -> tuple[torch.Tensor, torch.Tensor]:
    """Per global token: its document and its position in it."""
    lengths = torch.tensor(sharding.doc_lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return doc, torch.arange(int(lengths.sum())) - starts[doc]


def true_visibility(sharding, mask: BandMask) -> torch.Tensor:
    doc, position = global_positions(sharding)
    offset = position[None, :] - position[:, None]
    visible = doc[:, None] == doc[None, :]
    if mask.lo is not None:
        visible &= offset >= mask.lo
    if mask.hi is not None:
        visible &= offset <= mask.hi
    return visible


def call_rows(sharding: Sharding, rank: int, lanes: range) -> list[range]:
    """Local rows of a run of lanes: per document, its valid rows (one 'document' if dense)."""
    if not sharding.varlen:
        rows = sharding.lane_slice(lanes)
        return [range(rows.start, rows.stop)]
    starts, used = sharding.lane_rows(rank, lanes)
    return [range(start, start + n) for start, n in zip(starts, used)]


def computed_pairs(sharding: Sharding, mask: BandMask) -> tuple[torch.Tensor, object]:
    """How many times the schedule computes each (query, key) pair of the full sequence."""
    schedule = build_schedule(sharding, mask)
    total = sharding.total_len
    count = torch.zeros(total, total, dtype=torch.long)
    for rank in range(sharding.world_size):
        q_index = sharding.token_index(rank)
        for step, calls in zip(schedule.steps, schedule.calls[rank]):
            source = schedule.source_rank(rank, step)
            kv_index = sharding.token_index(source)
            for call in calls:
                for q_rows, kv_rows in zip(call_rows(sharding, rank, call.q_lanes), call_rows(sharding, source, call.kv_lanes)):
                    if not q_rows or not kv_rows:
                        continue
                    visible = band_visibility(len(q_rows), len(kv_rows), call.mask, torch.device("cpu"))
                    queries = q_index[q_rows.start : q_rows.stop]
                    keys = kv_index[kv_rows.start : kv_rows.stop]
                    assert (queries >= 0).all() and (keys >= 0).all(), "a call selected a padding slot"
                    qi, ki = visible.nonzero(as_tuple=True)
                    count.index_put_((queries[qi], keys[ki]), torch.ones_like(qi), accumulate=True)
    return count, schedule


MASKS = {
    "full": BandMask(),
    "causal": BandMask(hi=0),
    "causal_diagonal_shifted": BandMask(hi=-3),
    "window_left": BandMask(lo=-5, hi=0),
    "window_tiny": BandMask(lo=-1, hi=1),
    "window_wide": BandMask(lo=-40, hi=17),
    "future_only": BandMask(lo=2, hi=9),
    "empty": BandMask(lo=3, hi=1),
}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8, 16, 72])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_dense_schedule_computes_each_visible_pair_once(world_size, layout, mask_name):
    chunks = 2 * world_size if layout == "zigzag" else world_size
    for chunk_size in (1, 3, 8) if world_size <= 16 else (2,):
        sharding = Sharding.dense(chunks * chunk_size, world_size, layout)
        count, _ = computed_pairs(sharding, MASKS[mask_name])
        assert torch.equal(count, true_visibility(sharding, MASKS[mask_name]).long()), f"chunk size {chunk_size}"


def document_lengths(world_size: int) -> list[int]:
    two_w = 2 * world_size
    return [3 * two_w + 1, world_size, 1, two_w + 5, 0, 7, 2 * two_w]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8, 72])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("mask_name", ["full", "causal"])
def test_document_schedule_computes_each_visible_pair_once(world_size, layout, mask_name):
    sharding = Sharding.documents(document_lengths(world_size), world_size, layout)
    count, _ = computed_pairs(sharding, MASKS[mask_name])
    assert torch.equal(count, true_visibility(sharding, MASKS[mask_name]).long())


def test_documents_of_one_chunk_size_take_any_window():
    sharding = Sharding.documents([24, 21, 19], 3, "zigzag")  # every document: 6 chunks of 4 slots
    count, _ = computed_pairs(sharding, BandMask(lo=-5, hi=2))
    assert torch.equal(count, true_visibility(sharding, BandMask(lo=-5, hi=2)).long())


def test_one_schedule_cannot_window_documents_of_different_chunk_sizes():
    """The plan then follows one schedule per chunk size (test_document_plans_window_...)."""
    sharding = Sharding.documents([48, 12], 2, "zigzag")
    with pytest.raises(ValueError, match="chunk offsets differ between documents"):
        build_schedule(sharding, BandMask(lo=-5, hi=0))


WINDOW_DOCUMENTS = [48, 12, 1, 6, 5, 7, 130, 1, 0, 33]  # shorter than, equal to and longer than the windows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("mask_name", ["window_left", "window_tiny", "window_wide", "causal_diagonal_shifted"])
def test_document_plans_window_documents_of_every_chunk_size(world_size, layout, mask_name):
    sharding = Sharding.documents(WINDOW_DOCUMENTS, world_size, layout)
    count = planned_pairs(sharding, MASKS[mask_name])
    assert torch.equal(count, true_visibility(sharding, MASKS[mask_name]).long())


def test_balanced_plans_skip_steps_outside_every_window():
    sharding = Sharding.documents([4096, 4096, 64], 8, "balanced")
    window = BandMask(lo=-100, hi=0)
    steps = [step.step for step in rank_plan(sharding, window, 0, torch.device("cpu")).steps]
    # a 4096-token document spread over 8 ranks, 256-slot chunks: head chunks reach the previous
    # span rank (the forward stream), tail chunks the next one (the backward stream), both at step 1
    assert steps == [0, 1]
    assert torch.equal(planned_pairs(sharding, window), true_visibility(sharding, window).long())


@pytest.mark.parametrize("world_size", [2, 3, 8, 72])
def test_causal_zigzag_makes_one_call_per_step(world_size):
    schedule = build_schedule(Sharding.dense(4 * world_size, world_size, "zigzag"), BandMask(hi=0))
    assert schedule.steps == tuple(range(world_size))
    assert all(len(calls) == 1 for per_rank in schedule.calls for calls in per_rank)
    assert all(schedule.calls[rank][0][0].mask == BandMask(hi=0) for rank in range(world_size))
    assert all(call.mask.is_full for per_rank in schedule.calls for calls in per_rank[1:] for call in calls)


@pytest.mark.parametrize("world_size", [2, 5, 8])
def test_full_mask_is_one_unmasked_call_per_step(world_size):
    schedule = build_schedule(Sharding.dense(2 * world_size * 3, world_size, "zigzag"), BandMask())
    assert all(calls == schedule.calls[0][0] for per_rank in schedule.calls for calls in per_rank)
    assert [len(calls) for calls in schedule.calls[0]] == [1] * world_size
    assert schedule.calls[0][0][0].mask.is_full


def test_hops_outside_a_sliding_window_are_skipped():
    contiguous = build_schedule(Sharding.dense(8 * 16, 8, "contiguous"), BandMask(lo=-10, hi=0))
    assert contiguous.steps == (0, 1)  # only the previous rank's KV is in reach
    zigzag = build_schedule(Sharding.dense(16 * 16, 8, "zigzag"), BandMask(lo=-10, hi=0))
    assert zigzag.steps == (0, 1, 7)  # head chunks reach rank - 1; tail chunks reach rank + 1 (step W - 1)
    empty = build_schedule(Sharding.dense(16 * 4, 8, "zigzag"), BandMask(lo=3, hi=1))
    assert empty.steps == ()


def band_of(truth_by_offset: dict[int, bool]) -> bool:
    """Whether one band lo <= j - i <= hi gives these visibilities: the visible offsets form an
    interval with no hidden offset inside it."""
    visible = [d for d, seen in truth_by_offset.items() if seen]
    return bool(visible) and all(truth_by_offset.get(d, True) for d in range(min(visible), max(visible) + 1))


def rectangle_is_one_band(q_chunks, kv_chunks, q_lanes: range, kv_lanes: range, mask: BandMask, sizes) -> bool:
    """Brute force: one band, in the rectangle's local coordinates, computes exactly the pairs it
    sees, for every chunk size at once."""
    truth: dict[int, bool] = {}
    for size in sizes:
        offsets = torch.arange(size)
        for a in q_lanes:
            for b in kv_lanes:
                i = (a - q_lanes.start) * size + offsets[:, None]  # local coordinates in the rectangle
                j = (b - kv_lanes.start) * size + offsets[None, :]
                shift = (kv_chunks[b] - q_chunks[a]) * size + offsets[None, :] - offsets[:, None]  # global key offset
                seen = torch.ones_like(shift, dtype=torch.bool)
                if mask.lo is not None:
                    seen &= shift >= mask.lo
                if mask.hi is not None:
                    seen &= shift <= mask.hi
                for d, s in zip((j - i).flatten().tolist(), seen.flatten().tolist()):
                    if truth.setdefault(d, s) != s:
                        return False
    return band_of(truth)


def least_cover(q_chunks, kv_chunks, mask: BandMask, sizes) -> tuple[int, int]:
    """(calls, lane-pair area) of the best disjoint cover of the visible lane pairs, by brute force."""
    lanes_q, lanes_kv = range(len(q_chunks)), range(len(kv_chunks))
    runs = lambda n: [range(s, e) for s in range(n) for e in range(s + 1, n + 1)]  # noqa: E731
    visible = {
        (a, b) for a in lanes_q for b in lanes_kv
        if rectangle_is_one_band(q_chunks, kv_chunks, range(a, a + 1), range(b, b + 1), mask, sizes)
    }
    if not visible:
        return 0, 0
    options = [
        {(a, b) for a in q for b in kv}
        for q in runs(len(q_chunks)) for kv in runs(len(kv_chunks))
        if rectangle_is_one_band(q_chunks, kv_chunks, q, kv, mask, sizes)
    ]
    for count in range(1, len(visible) + 1):
        areas = [
            sum(map(len, chosen)) for chosen in itertools.combinations(options, count)
            if set().union(*chosen) >= visible and sum(map(len, chosen)) == len(set().union(*chosen))
        ]
        if areas:
            return count, min(areas)
    raise AssertionError("no cover")


AREA_RUNS = [(world, layout, name) for world in (1, 2, 3, 4, 5, 8) for layout in ("zigzag", "contiguous") for name in MASKS]


@pytest.mark.parametrize(("world_size", "layout", "mask_name"), AREA_RUNS, ids=[f"W{w}-{l}-{m}" for w, l, m in AREA_RUNS])
def test_schedule_covers_the_least_area(world_size, layout, mask_name):
    """Per rank and step, as few calls and as little lane-pair area as a brute-force search finds,
    for the dense chunk sizes and documents of mixed sizes that the tests above use."""
    mask = MASKS[mask_name]
    shardings = [Sharding.dense(chunks * size, world_size, layout) for chunks in [2 * world_size if layout == "zigzag" else world_size] for size in (1, 3)]
    if mask_name in ("full", "causal"):
        shardings.append(Sharding.documents(document_lengths(world_size), world_size, layout))
    for sharding in shardings:
        schedule = build_schedule(sharding, mask)
        sizes = tuple(sorted({size for size in sharding.chunk_sizes if size > 0}))
        best: dict[tuple, tuple[int, int]] = {}
        for rank in range(world_size):
            calls_at = dict(zip(schedule.steps, schedule.calls[rank]))
            for step in range(world_size):
                q_chunks, kv_chunks = sharding.chunks_of(rank), sharding.chunks_of((rank - step) % world_size)
                key = (q_chunks, kv_chunks)
                if key not in best:
                    best[key] = least_cover(q_chunks, kv_chunks, mask, sizes)
                calls = calls_at.get(step, ())
                ours = (len(calls), sum(len(c.q_lanes) * len(c.kv_lanes) for c in calls))
                assert ours == best[key], f"rank {rank} step {step} sizes {sizes}: schedule {ours}, least {best[key]}"


def planned_pairs(sharding, mask: BandMask) -> torch.Tensor:
    """How many times the ranks' plans compute each (query, key) pair; also checks that no block
    writes a row twice (sequences of one launch must not overlap), and that a masked block's
    sequences share one kv shift."""
    total = sharding.total_len
    count = torch.zeros(total, total, dtype=torch.long)
    for rank in range(sharding.world_size):
        plan = rank_plan(sharding, mask, rank, torch.device("cpu"))
        for step in plan.steps:
            for block in step.blocks:
                # a stream's rows are the rows its origin put in it, in the origin's stream order
                stream = plan.streams[block.stream]
                source = rank if block.local else stream.origin(rank, sharding.world_size, stream.steps.index(step.step))
                key_tokens = sharding.token_index(source)
                if not block.local and stream.own_rows is not None:
                    key_tokens = key_tokens[rank_plan(sharding, mask, source, torch.device("cpu")).streams[block.stream].own_rows]
                rows = block.varlen
                q_taken, kv_taken = set(), set()
                for n in range(len(rows.seqused_q)):
                    q0, nq = int(rows.cu_seqlens_q[n]), int(rows.seqused_q[n])
                    k0, nk = int(rows.cu_seqlens_k[n]), int(rows.seqused_k[n])
                    if not (nq and nk):
                        continue
                    assert block.mask.is_full or nk - nq == rows.kv_shift, f"kv shift {rows.kv_shift}, sequence {nk} - {nq}"
                    assert not (q_taken & set(range(q0, q0 + nq))) and not (kv_taken & set(range(k0, k0 + nk))), "overlapping sequences"
                    q_taken |= set(range(q0, q0 + nq))
                    kv_taken |= set(range(k0, k0 + nk))
                    queries = sharding.token_index(rank)[q0 : q0 + nq]
                    keys = key_tokens[k0 : k0 + nk]
                    assert (queries >= 0).all() and (keys >= 0).all(), "a block selected a padding slot"
                    qi, ki = band_visibility(nq, nk, block.mask, torch.device("cpu")).nonzero(as_tuple=True)
                    count.index_put_((queries[qi], keys[ki]), torch.ones_like(qi), accumulate=True)
    return count


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("mask_name", ["full", "causal", "window_left", "window_wide"])
@pytest.mark.parametrize("lengths", [
    [700, 3, 0, 1, 250, 64, 129, 2000, 17], [5000, 2, 1], [1, 2, 3, 5, 8, 13], [300, 300, 301, 299],
], ids=["mixed", "one_huge", "short", "equal"])
def test_balanced_plans_compute_each_visible_pair_once(world_size, mask_name, lengths):
    sharding = Sharding.documents(lengths, world_size, "balanced")
    count = planned_pairs(sharding, MASKS[mask_name])
    assert torch.equal(count, true_visibility(sharding, MASKS[mask_name]).long())


def lognormal_lengths(total: int, seed: int) -> list[int]:
    import math
    import random

    generator, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(max(1, min(total // 2, int(generator.lognormvariate(math.log(1200), 1.4)))))
    lengths[-1] -= sum(lengths) - total
    return lengths


@pytest.mark.parametrize("world_size", [2, 8, 16])
@pytest.mark.parametrize("mask_name", ["causal", "full", "window_left"])
def test_balanced_kv_goes_only_to_the_ranks_of_its_span_in_shrinking_hops(world_size, mask_name):
    """Every hop of a balanced plan carries only documents whose span holds the rank it goes to,
    each stream's hops shrink as it goes, a span of g ranks takes steps 1..g-1, and, causal, a
    rank receives no more than its mask needs."""
    sharding = Sharding.documents(lognormal_lengths(2048 * world_size, world_size), world_size, "balanced")
    mask, cpu = MASKS[mask_name], torch.device("cpu")
    doc_of_token, _ = global_positions(sharding)
    plans = [rank_plan(sharding, mask, rank, cpu) for rank in range(world_size)]
    widest = max(ranks for _, ranks in sharding.spans)
    if mask_name != "window_left":
        assert [step.step for step in plans[0].steps] == list(range(widest))
    for plan in plans:
        for stream in plan.streams:
            tokens = sharding.token_index(plan.rank)[stream.own_rows]
            for position, step in enumerate(stream.steps):
                rows = stream.held_rows[plan.rank][position]
                assert position == 0 or rows <= stream.held_rows[plan.rank][position - 1], "a stream's hops shrink"
                receiver = (plan.rank + stream.direction * step) % world_size
                carried = tokens[:rows]
                for doc in doc_of_token[carried[carried >= 0]].unique().tolist():
                    first, ranks = sharding.spans[doc]
                    assert (receiver - first) % world_size < ranks, f"document {doc} went to rank {receiver}, outside its span"
    if mask_name == "causal":
        streams = span_streams(sharding, band_interval(mask))
        for rank in range(world_size):
            needed = 0
            for doc, (first, ranks) in enumerate(sharding.spans):
                member = (rank - first) % world_size
                if ranks > 1 and member < ranks:  # one chunk of every earlier member, both chunks of every later one
                    needed += sharding.chunk_size(doc) * (member + 2 * (ranks - 1 - member))
            assert streams.received_rows(rank) <= needed and sharding.causal_kv_rows[rank] == needed
