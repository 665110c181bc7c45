"""Which Ulysses x ring split of W ranks to use: `plan_mesh` predicts one layer call (forward and
backward) for every split that can win and returns the fastest, with its reason.

The model is the ring model of bench/ring_model.py reduced to closed form:
- a ring of r ranks makes r steps; each step costs max(its compute, its KV hop) plus a fixed
  overhead (launches, work beside attention), forward and backward (whose hop also carries the
  fp32 dK/dV); the call adds its work beside attention that does not grow with the steps (fills,
  the dq read-back, the dK/dV finish), in proportion to a GPU's tokens x heads;
- compute is the call's attention FLOPs per GPU at a sustained rate, whatever the split (the
  FLOPs are the same; Ulysses only makes the blocks u times larger);
- the Ulysses all-to-alls move q, k, v (one exchange), out and lse forward, dout, dq, dk and dv
  backward, (u - 1) / u of each rank's share, KV heads repeated to u where fewer; each exchange
  costs a latency; until 2026-12-08 every tensor exchanged was also copied into a send buffer
  and out of the receive region, SM copies on the compute stream (charged since 2026-12-07:
  they took about as long as the fine-tuning-like mix's attention in bench/gpu_work.py's 2-D
  cases; `layout_ms` for older code); since, the copy engine sends each piece from where it
  lies and places what arrives, behind each transfer on its stream (`exchange_parts_ms`), and no
  SM copy is left; in c head chunks (runtime/ulysses.py) chunk j + 1's inbound exchange and chunk
  j's outbound one run behind chunk j's ring (`pipeline_ms`), while each chunk's ring runs at its
  own h / (u c) heads, paying its steps' fixed costs and its launches in full, and a fixed cost
  beside (`Machine.chunk_fixed_ms`);
- packed causal documents are placed over the r ring ranks as the balanced layout places them
  (plan/placement.py), and each ring rank's compute is FA4's modelled time for its h/u heads
  (kernel_cost.py, fitted on one-GPU runs), the slowest rank setting the step; a hop carries the
  placement's travelling rows, and the steps beyond the widest document's span are skipped. So
  the split is chosen for the batch's documents: more ulysses ranks keep more documents whole.
Machine figures: H200's from this project's runs (named in `measured`); GB200 NVL72's ASSUMED.
The all-to-all figures are assumed on both, and no 2-D prediction has been checked against a
multi-GPU run yet (the multi-GPU issue measures 2 x 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..plan.head_chunks import HeadChunks
from ..plan.placement import BalancedSharding, balanced_sharding, placement_heads, slowest_rank_ms, span_cost, span_widths
from ..validation import heads_split
from .kernel_cost import CALIBRATED_HEAD_DIM, CALIBRATED_HEADS, CALIBRATED_TOKENS, RING, one_device_us, step_us

BYTES_16BIT = 2
BACKWARD_FLOPS_RATIO = 2.5  # a backward does 2.5x the forward's matmul work
HEAD_CHUNKS = (1, 2, 4, 8)  # what plan_mesh weighs for a 2-D split, where the heads allow


@dataclass(frozen=True)
class Machine:
    name: str
    attention_tflops: float
    """Sustained attention kernels, forward and backward together (TFLOP/s per GPU)."""
    step_overhead_ms: float
    """Fixed cost of one ring step, forward and backward together."""
    step_launch_ms: float
    """The part of `step_overhead_ms` that is the step's launches: packed documents' per-rank
    costs carry their own (placement.rank_costs_ms)."""
    call_overhead_ms: float
    """Work beside attention per layer call, forward and backward, at 8K tokens of 64 heads of 128
    per GPU (it scales with a GPU's tokens x heads x head_dim)."""
    hop_latency_ms: float
    hop_gib_per_s: float
    all_to_all_latency_ms: float
    all_to_all_gib_per_s: float
    layout_gib_per_s: float = math.inf
    """The exchanges' layout copies, SM work on the compute stream: bytes copied per second
    (`layout_bytes`); inf charges none."""
    local_copy_gib_per_s: float = math.inf
    """The copy engine's copies within a GPU that place what an exchange brings into its heads
    (comm/all_to_all.place_arrived), on the exchange's stream (`exchange_parts_ms`); inf charges none."""
    chunk_fixed_ms: float = 0.22
    """What each head chunk past the first adds to a 2-D call beyond its ring's steps and launches,
    fwd + bwd (its fills and partial sums; launches of fewer heads running less well): the median
    over the 2-D splits replayed in 2 and 4 chunks on an H100 (bench/fit_chunk_cost.py on
    bench/results/nvidia_h100_2026-12-06_s23/magi_replay.json.gz: 0.217 ms, quartiles 0.16-0.44)."""
    measured: dict[str, str] = field(default_factory=dict)
    """Where each figure comes from; a figure not named here is assumed."""

    @property
    def packed_step_ms(self) -> float:
        """A ring step's fixed cost over packed documents: its launches are in each rank's costs
        (placement.rank_costs_ms), so only the work beside attention is left."""
        return self.step_overhead_ms - self.step_launch_ms


# kernel_cost.RING's replay fits: a step's forward launch and its work beside attention, the call's
# work beside attention (on an H100, whose memory is slower than the H200's: upper bounds here)
_STEP_MS, _LAUNCH_MS, _CALL_MS = step_us() / 1e3, RING.launch / 1e3, RING.call_other / 1e3
# The exchanges' layout copies on an H100: `layout_bytes` ("laid_out", as at 27070ae) over their
# time, 716-727 GiB/s in the four 2-D cases of bench/results/nvidia_h100_2026-12-07_s28/
# gpu_work.json.gz (bench/layout_cost.py, median). Elsewhere ASSUMED: scaled by the HBM bandwidth
# (H200 4.8, GB200 8.0 TB/s against 3.35).
LAYOUT_H100_GIB_PER_S = 718.0
# The copy engine's copies within a GPU that place what arrives (since 2026-12-08): `placed_bytes`
# from the peers over their time on the exchange's stream, 550-558 GiB/s in the two un-chunked 2-D
# cases of bench/results/nvidia_h100_2026-12-08_s37/gpu_work_2d.json (bench/layout_cost.py --code
# placed, median). Elsewhere ASSUMED: scaled by HBM bandwidth as above.
LOCAL_COPY_H100_GIB_PER_S = 558.0

H200 = Machine(
    "H200", attention_tflops=480.0, step_overhead_ms=_STEP_MS, step_launch_ms=_LAUNCH_MS, call_overhead_ms=_CALL_MS, hop_latency_ms=0.073,
    hop_gib_per_s=354.0, all_to_all_latency_ms=0.05, all_to_all_gib_per_s=300.0, layout_gib_per_s=LAYOUT_H100_GIB_PER_S * 4.8 / 3.35,
    local_copy_gib_per_s=LOCAL_COPY_H100_GIB_PER_S * 4.8 / 3.35,
    measured={
        "attention_tflops": "bench/results/nvidia_h200_2026-12-01/kernels_nvidia_h200_2026-12-01_quick.json.gz (fa4_cp fwd and bwd step, d 128, 8K)",
        "step_overhead_ms": "tuning/kernel_cost.py RING.launch (nvidia_h200_2026-12-06/fit_replay_costs_staged.json.gz) + RING.step_other (nvidia_h100_2026-12-06_s14/fit_replay_costs.json, an H100)",
        "call_overhead_ms": "tuning/kernel_cost.py RING.call_other (bench/results/nvidia_h100_2026-12-06_s14/fit_replay_costs.json, an H100)",
        "hop_latency_ms": "bench/results/nvidia_h200_2026-12-01/ring_model_2026-12-01.json.gz (copy-engine hop fit)",
        "hop_gib_per_s": "bench/results/nvidia_h200_2026-12-01/ring_model_2026-12-01.json.gz (copy-engine hop fit)",
        "chunk_fixed_ms": "bench/results/cpu_2026-12-06_s24/fit_chunk_cost.json (the H100 replay of nvidia_h100_2026-12-06_s23, chunked splits against whole)",
    },
)
GB200_NVL72 = Machine(
    "GB200 NVL72 (assumed)", attention_tflops=480.0 * 2250.0 / 989.4, step_overhead_ms=_STEP_MS, step_launch_ms=_LAUNCH_MS, call_overhead_ms=_CALL_MS, hop_latency_ms=0.073,
    hop_gib_per_s=2 * 354.0, all_to_all_latency_ms=0.05, all_to_all_gib_per_s=600.0, layout_gib_per_s=LAYOUT_H100_GIB_PER_S * 8.0 / 3.35,
    local_copy_gib_per_s=LOCAL_COPY_H100_GIB_PER_S * 8.0 / 3.35,
)


@dataclass(frozen=True)
class MeshPlan:
    ulysses: int
    ring: int
    predicted_ms: float
    efficiency: float
    """The attention compute alone over the predicted time."""
    reason: str
    candidates: tuple[dict, ...]
    """Every split predicted, with its prediction, by ulysses: the plain ring always; with packed
    documents, a split whose lower bound is above the fastest so far is left out, unless
    `every_split` was asked."""
    head_chunks: int = 1
    """The split's head chunks (ring_attention's `ulysses_chunks`): 1 for the plain ring."""


def plan_mesh(
    world_size: int, heads: int, kv_heads: int, seq_len: int, *, head_dim: int = 128, causal: bool = True,
    documents: list[int] | None = None, machine: Machine = H200, every_split: bool = False,
) -> MeshPlan:
    """The fastest (ulysses, ring) split of `world_size` ranks for a layer of `heads` / `kv_heads`
    heads over `seq_len` tokens (packed `documents`, if given), on `machine`.

    Packed documents are placed once per split weighed (host time: 0.1-0.3 s at W = 64-72 on a
    slow host for a fine-tuning-like batch), so a split whose lower bound (`_split_floor_ms`) is
    above the fastest prediction so far is not placed; `every_split` predicts every one."""
    if world_size < 1 or heads < 1 or kv_heads < 1 or heads % kv_heads or seq_len < 1:
        raise ValueError(f"world_size, heads, kv_heads, seq_len: expected positive counts with kv_heads dividing heads, got {(world_size, heads, kv_heads, seq_len)}")
    splits = [u for u in range(1, world_size + 1) if world_size % u == 0 and heads_split(heads, kv_heads, u)]
    placed = documents and causal and not every_split
    if placed:  # the plain ring first (the reason names it), then the splits by their floor
        floors = {u: _split_floor_ms(u, world_size // u, heads, kv_heads, seq_len, head_dim, documents, machine) for u in splits}
        splits = sorted(splits, key=lambda u: (u != 1, floors[u]))
    predicted: list[dict] = []
    for u in splits:
        if placed and predicted and floors[u] > min(c["ms"] for c in predicted) * (1 + 1e-9):
            continue
        predicted.append(predict_split(u, world_size // u, heads, kv_heads, seq_len, head_dim, causal, documents, machine))
    candidates = tuple(sorted(predicted, key=lambda c: c["ulysses"]))
    best = min(candidates, key=lambda c: c["ms"])
    ring = next(c for c in candidates if c["ulysses"] == 1)
    reason = (
        f"{best['ulysses']} x {best['ring']} on {machine.name}: {best['ms']:.3f} ms per layer call (fwd+bwd), "
        f"{best['efficiency']:.0%} of the attention compute alone; the plain ring (1 x {world_size}) {ring['ms']:.3f} ms, "
        f"{ring['efficiency']:.0%}. Its ring steps are {best['bound']}-bound"
        + (
            f"; the all-to-alls take {best['all_to_all_ms']:.3f} ms, {best['exposed_all_to_all_ms']:.3f} ms of it exposed in "
            f"{best['head_chunks']} head chunk(s), and their layout copies {best['layout_ms']:.3f} ms." if best["ulysses"] > 1 else "."
        )
    )
    return MeshPlan(best["ulysses"], best["ring"], best["ms"], best["efficiency"], reason, candidates, best["head_chunks"])


def predict_split(
    u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, causal: bool, documents: list[int] | None,
    machine: Machine, placement: BalancedSharding | None = None,
) -> dict:
    """One u x r split's predicted layer call (fwd+bwd) and its parts; packed causal documents
    placed as `placement` places them over the r ring ranks (default: the balanced layout's)."""
    kv_heads_local = max(kv_heads // u, 1)
    step_ms = machine.step_overhead_ms
    if documents and causal:
        sharding = placement if placement is not None else balanced_sharding(tuple(int(n) for n in documents), r, placement_heads(u))
        ideal_ms, steps, travelling_rows = _documents_layout(sharding, u, r, heads, head_dim)

        def chunk_compute(chunks: int) -> tuple[float, float]:
            """One chunk's slowest ring rank, forward and backward: its tiles at its own heads, its
            launches in full (they cost the same at any heads)."""
            return slowest_rank_ms(sharding, heads // u // chunks, head_dim)

        step_ms = machine.packed_step_ms
    else:
        lengths = documents or [seq_len]
        pair_fraction = 0.5 if causal else 1.0
        forward_flops = sum(4 * n * n * pair_fraction * heads * head_dim for n in lengths)
        ideal_ms = forward_flops * (1 + BACKWARD_FLOPS_RATIO) / (u * r) / (machine.attention_tflops * 1e12) * 1e3
        steps, travelling_rows = r, seq_len / r
        if documents:  # the balanced layout skips the steps no document's span reaches
            share = seq_len / r
            travelling_rows = sum(n for n in lengths if n > share) / r
            steps = 1 + min(r - 1, 2 * (min(r, math.ceil(max(lengths) / share)) - 1))

        def chunk_compute(chunks: int) -> tuple[float, float]:
            return ideal_ms / (1 + BACKWARD_FLOPS_RATIO) / chunks, ideal_ms * BACKWARD_FLOPS_RATIO / (1 + BACKWARD_FLOPS_RATIO) / chunks

    kv_bytes = 2 * travelling_rows * kv_heads_local * head_dim * BYTES_16BIT
    dkv_bytes = 2 * kv_bytes  # fp32
    hops = steps - 1

    def ring_passes(forward_ms: float, backward_ms: float, kv_share: float) -> tuple[float, float]:
        """A ring whose slowest rank computes `forward_ms` and `backward_ms` over its steps and
        whose hops carry `kv_share` of the rank's KV: forward and backward ms, each step's fixed
        cost paid in full, half to each pass."""
        step_fwd, step_bwd = forward_ms / steps, backward_ms / steps
        hop_f, hop_b = hop_ms(kv_bytes * kv_share, machine), hop_ms((kv_bytes + dkv_bytes) * kv_share, machine)
        return (
            step_fwd + hops * max(step_fwd, hop_f) + steps * step_ms / 2,
            step_bwd + hops * max(step_bwd, hop_b) + steps * step_ms / 2,
        )

    forward_ms, backward_ms = chunk_compute(1)
    compute_ms = forward_ms + backward_ms
    forward_ring, backward_ring = ring_passes(forward_ms, backward_ms, 1.0)
    ring_ms = forward_ring + backward_ring
    hop_fwd, hop_bwd = hop_ms(kv_bytes, machine), hop_ms(kv_bytes + dkv_bytes, machine)
    bound = "hop" if hops and (hop_fwd > forward_ms / steps or hop_bwd > backward_ms / steps) else "compute"
    if step_ms * steps > compute_ms / 2:
        bound = "overhead"
    exchange_ms = all_to_all_ms(u, r, heads, kv_heads, seq_len, head_dim, machine)
    call_ms = _call_ms(u, r, heads, seq_len, head_dim, machine)
    best_chunks, passes_ms = 1, ring_ms + exchange_ms
    for chunks in head_chunk_counts(heads, kv_heads, u) if u > 1 else ():
        kv_count = min(chunks, max(kv_heads // u, 1))
        forward_chunk, backward_chunk = (
            ring + machine.chunk_fixed_ms / 2 * (chunks - 1) / chunks  # each chunk's share of the chunks' fixed cost, half a pass
            for ring in ring_passes(*chunk_compute(chunks), 1 / kv_count)
        )
        parts = exchange_parts_ms(u, r, heads, kv_heads, seq_len, head_dim, machine, chunks)
        pipelined = (
            pipeline_ms(parts["forward_in"], [forward_chunk] * chunks, parts["forward_out"])
            + pipeline_ms(parts["backward_in"], [backward_chunk] * chunks, parts["backward_out"])
        )
        if pipelined < passes_ms * (1 - 1e-9):  # one chunk's pipeline is the call as it stands
            best_chunks, passes_ms = chunks, pipelined
    copies_ms = layout_ms(u, r, heads, kv_heads, seq_len, head_dim, machine)
    total = passes_ms + call_ms + copies_ms
    return {
        "ulysses": u, "ring": r, "active_steps": steps, "step_ms": step_ms, "ms": total, "ring_ms": ring_ms, "all_to_all_ms": exchange_ms, "call_ms": call_ms,
        "layout_ms": copies_ms,
        "head_chunks": best_chunks, "exposed_all_to_all_ms": max(passes_ms - ring_ms, 0.0),
        "compute_ms": compute_ms, "efficiency": ideal_ms / total, "bound": bound, "hop_bytes": kv_bytes,
    }


def head_chunk_counts(heads: int, kv_heads: int, u: int) -> list[int]:
    """The head chunks of HEAD_CHUNKS that a u-way split of the heads allows (plan/head_chunks.py)."""
    allowed = []
    for chunks in HEAD_CHUNKS:
        try:
            HeadChunks.of(heads // u, max(kv_heads // u, 1), chunks)
        except ValueError:
            continue
        allowed.append(chunks)
    return allowed


def exchange_parts_ms(
    u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, machine: Machine, chunks: int,
) -> dict[str, list[float]]:
    """Each head chunk's exchanges as runtime/ulysses.py runs them (4 a chunk), (u - 1) / u of a
    rank's share of: forward in q (and the KV its chunk brings), out (with lse); backward in dout,
    out dq (and the dK/dV its chunk finishes); a latency each. KV heads repeated to u where fewer.
    Behind each transfer, on its stream, the copy engine places all u pieces of what arrived into
    their heads (at `local_copy_gib_per_s`), but for dout, which the backward reads where it lands."""
    rank_head_bytes = seq_len / (u * r) * head_dim * BYTES_16BIT
    kv_count = min(chunks, max(kv_heads // u, 1))
    per_kv = chunks // kv_count
    kv_travelling = 2 * max(kv_heads, u) / kv_count  # k and v heads of one KV chunk, over all ranks

    def ms(head_count: float, placed: bool = True) -> float:
        moved = head_count * rank_head_bytes * (u - 1) / u / (machine.all_to_all_gib_per_s * 2**30)
        placing = head_count * rank_head_bytes / (machine.local_copy_gib_per_s * 2**30) if placed else 0.0
        return machine.all_to_all_latency_ms + (moved + placing) * 1e3

    q_heads = heads / chunks
    return {
        "forward_in": [ms(q_heads + (kv_travelling if j % per_kv == 0 else 0)) for j in range(chunks)],
        "forward_out": [ms(q_heads)] * chunks,
        "backward_in": [ms(q_heads, placed=False)] * chunks,
        "backward_out": [ms(q_heads + (kv_travelling if (j + 1) % per_kv == 0 else 0)) for j in range(chunks)],
    }


def pipeline_ms(inbound: list[float], rings: list[float], outbound: list[float]) -> float:
    """One pass of a 2-D call in head chunks, on a compute stream and one exchange stream, in
    runtime/ulysses.py's order: inbound 0; then per chunk j, inbound j + 1 (queued behind ring
    j - 1), ring j (once inbound j is in), outbound j (behind ring j). When the last outbound
    exchange lands."""
    exchange = inbound[0]
    arrived = [exchange] + [0.0] * (len(rings) - 1)
    ring_end = 0.0
    for chunk, ring in enumerate(rings):
        began = max(ring_end, arrived[chunk])
        if chunk + 1 < len(rings):
            exchange = arrived[chunk + 1] = max(exchange, ring_end) + inbound[chunk + 1]
        ring_end = began + ring
        exchange = max(exchange, ring_end) + outbound[chunk]
    return exchange


def all_to_all_ms(u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, machine: Machine) -> float:
    """The Ulysses exchanges of one call in one chunk, all of them (`exchange_parts_ms`)."""
    if u == 1:
        return 0.0
    return sum(sum(times) for times in exchange_parts_ms(u, r, heads, kv_heads, seq_len, head_dim, machine, 1).values())


LAYOUT_CODES = ("laid_out", "rows_in_place", "placed")
"""What the exchanges copied on the SMs, by the code's date: every part laid out (27070ae); out,
dq, dk and dv sent from where the ring wrote them and dout read where it lands (2026-12-07,
b7711fb); and since 2026-12-08 nothing: every piece sent as it lies and what arrives placed into
its heads by the copy engine (exchange_parts_ms charges that, on the exchange's stream)."""


def layout_bytes(u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, code: str = "placed") -> float:
    """Bytes a GPU's SM layout copies move in one call (fwd + bwd) on the compute stream
    (runtime/exchange.py): q, out, dout, dq and k, v, dk, dv (KV heads repeated to u where fewer,
    their dK/dV then in fp32), each copied into the send buffer and out of the receive region
    ("laid_out"). Where the transport copies into its peers and no batch dim is wider than one,
    out, dq, dk and dv go back from where the ring wrote them and the backward reads dout where it
    lands ("rows_in_place"; of dq, dk and dv the last rank's piece is counted laid out: it is
    where a ring rank's rows are padded to a multiple of u). Since "placed", the copy engine's
    2-D copies send every piece as it lies (short past the rows' end) and place what arrives:
    no SM copy is left."""
    if code not in LAYOUT_CODES:
        raise ValueError(f"code: expected one of {LAYOUT_CODES}, got {code!r}")
    if u == 1 or code == "placed":
        return 0.0
    tokens = seq_len / (u * r)
    q = tokens * heads * head_dim * BYTES_16BIT
    kv = tokens * max(kv_heads, u) * head_dim * BYTES_16BIT
    dkv = kv * (2 if kv_heads < u else 1)
    rows_in_place = 2 * q + (q + 2 * dkv) * (u - 1) / u
    return 2 * (4 * q + 2 * kv + 2 * dkv) - (rows_in_place if code == "rows_in_place" else 0.0)


def placed_bytes(u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int) -> float:
    """Bytes the copy engine places on a GPU in one call (fwd + bwd), all u pieces of each exchange,
    as `exchange_parts_ms` charges them: q, k and v in; out out; dq, dk and dv out (dout is read
    where it lands). KV heads repeated to u where fewer."""
    if u == 1:
        return 0.0
    kv_travelling = 2 * max(kv_heads, u)
    return (3 * heads + 2 * kv_travelling) * seq_len / (u * r) * head_dim * BYTES_16BIT


def layout_ms(u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, machine: Machine) -> float:
    return layout_bytes(u, r, heads, kv_heads, seq_len, head_dim) / (machine.layout_gib_per_s * 2**30) * 1e3


def _call_ms(u: int, r: int, heads: int, seq_len: int, head_dim: int, machine: Machine) -> float:
    """The call's work beside attention that does not grow with the steps, per a GPU's tokens x heads."""
    return machine.call_overhead_ms * seq_len / (u * r) * heads * head_dim / (CALIBRATED_TOKENS * CALIBRATED_HEADS * CALIBRATED_HEAD_DIM)


def _split_floor_ms(u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, documents: list[int], machine: Machine) -> float:
    """No placement of `documents` over the r ring ranks makes `predict_split` faster: its ring
    takes at least the ranks' mean attention (each document at the span width that costs the
    ranks least in all) and one step's fixed cost, beside the same all-to-alls and call work."""
    widths = span_widths(r)
    least = sum(min(g * span_cost(n, g) for g in widths) for n in documents if n)  # us, 64 heads of 128
    compute_ms = least / r / 1e3 * (heads // u) * head_dim / (CALIBRATED_HEADS * CALIBRATED_HEAD_DIM)
    return (
        compute_ms + machine.packed_step_ms + _exposed_exchange_floor_ms(u, r, heads, kv_heads, seq_len, head_dim, machine)
        + _call_ms(u, r, heads, seq_len, head_dim, machine) + layout_ms(u, r, heads, kv_heads, seq_len, head_dim, machine)
    )


def _exposed_exchange_floor_ms(u: int, r: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, machine: Machine) -> float:
    """The least of a split's exchanges that no head chunking hides: each pass's first inbound and
    last outbound exchange."""
    if u == 1:
        return 0.0
    floors = []
    for chunks in head_chunk_counts(heads, kv_heads, u):
        parts = exchange_parts_ms(u, r, heads, kv_heads, seq_len, head_dim, machine, chunks)
        floors.append(sum(parts[f"{name}_in"][0] + parts[f"{name}_out"][-1] for name in ("forward", "backward")))
    return min(floors)


def _documents_layout(sharding: BalancedSharding, u: int, r: int, heads: int, head_dim: int) -> tuple[float, int, float]:
    """Packed causal documents placed over the r ring ranks of a u x r mesh: one device's work over
    the u x r ranks (ms), the active ring steps, and the KV rows a step's hops bring the
    slowest-fed rank (both streams, on average over its steps)."""
    ideal = sum(sum(one_device_us(n, heads, head_dim)) for n in sharding.doc_lengths if n) / (u * r)
    # A span of g ranks takes steps 1..g-1 after the local step 0 (span_rows.py); planning the
    # streams per split and batch would cost more host time than the model is worth.
    steps = max(1, *(ranks for _, ranks in sharding.spans))
    return ideal / 1e3, steps, max(sharding.causal_kv_rows) / max(steps - 1, 1)


def hop_ms(nbytes: float, machine: Machine) -> float:
    """One copy-engine hop of `nbytes` on `machine`: its latency and its bytes at the hop bandwidth."""
    return machine.hop_latency_ms + nbytes / (machine.hop_gib_per_s * 2**30) * 1e3
