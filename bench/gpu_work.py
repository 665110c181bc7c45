"""The ring's GPU work against one device's: every kernel that W simulated ranks launch for one
causal fwd+bwd call, summed (torch.profiler), against upstream FA4 on the whole input on one GPU.

    python bench/gpu_work.py [--cases dense_w8 pretrain_w8 finetune_w8 finetune_w16 pretrain_mesh_8x8
                              pretrain_mesh_8x2 finetune_mesh_8x2 finetune_mesh_8x8
                              pretrain_mesh_8x2_chunks_2 finetune_mesh_8x2_chunks_2] [--tree PATH] [--out PATH]

Each case runs the real API on a SimulatedRing (or SimulatedMesh) of W virtual ranks, FA4 backend,
bf16, head_dim 128. Kernels are sorted three ways:
- transport: the simulated transport's own copies (they stand for NVLink transfers; run on a stream
  of their own here, so that they are told apart by stream), reported apart and left out of the ratio;
- all_to_all_layout (2-D meshes): the Ulysses exchange's layout copies, on a stream of their own:
  its SM kernels (packing head groups and concatenating what arrives, until 2026-12-08; since, the
  pieces a transfer cannot take where they lie), reported apart, and the all-kernels ratio given
  with and without them (they are SM work on real GPUs too); and apart from them its copy-engine
  copies (`all_to_all_layout_copy_engine`: placing what arrives into its heads, no SM);
- attention: the CuTe-DSL kernels of attention (FA4's and fa4_cp's: forward, backward, FA4's
  pre/post-processing);
- other: everything else: torch's copies, fills, adds, index kernels, and fa4_cp's own read-back and
  finishing kernels (`RING_HELPER_KERNELS`), which stand where torch kernels stood.
The profiled call is the attention call and torch.autograd.grad of it, on leaves made beforehand
(no input copies, no .grad adds: until 2026-12-06 the ring's side cloned its inputs inside the
profile and one device's added into .grad). Each figure is the median of 3 profiled calls (one
device's: of 7), with the range of their totals. Ratios are one device's time over the ring's
(1.0: no work beyond one device's): attention kernels against one device's attention kernels,
and all kernels but the transport's against all of one device's. Per rank, the non-attention
kernels are listed with their launches per call, so that a kernel launched per ring step shows
(launches near the step count).

The mixes: document lengths log-normal until the total is filled (the last one cut):
pretraining-like median 1,200 tokens, sigma 1.4, capped at 64K; fine-tuning-like median 500,
sigma 0.9, capped at 16K. `--tree` runs another checkout's fa4_cp (a baseline) instead;
`--deterministic` makes the ring's calls with deterministic=True, and times the default ring
(`deterministic_vs_default`) and upstream's own deterministic backward on one device
(`upstream_deterministic_vs_default`) beside them, in the same run.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import add_forward_option_arguments, apply_forward_options, document_sharding, fa4_cp_from, record, write
from mixes import lognormal_lengths

HEAD_DIM = 128
CUTE_PREFIX = "kernel_cutlass"
RING_HELPER_KERNELS = ("DqReadback", "FinishDkv")  # fa4_cp's CuTe-DSL kernels that are not attention
REPEATS = 3
ANCHOR_REPEATS = 7  # one device's call is cheap, and its total moved 45-51 ms between H100 runs of the same case (s14-s19)


@dataclass(frozen=True)
class Case:
    world: int
    heads: tuple[int, int]
    tokens: int
    mix: str | None = None  # None: one dense sequence, zigzag; else packed documents, balanced layout
    ulysses: int = 1
    chunks: int = 1  # a 2-D call's head chunks (ulysses_chunks)


CASES = {
    "dense_w8": Case(8, (32, 8), 8 * 8192),
    "pretrain_w8": Case(8, (32, 8), 131072, "pretrain"),
    "finetune_w8": Case(8, (32, 8), 131072, "finetune"),
    "finetune_w16": Case(16, (32, 8), 131072, "finetune"),
    "pretrain_mesh_8x8": Case(64, (32, 8), 524288, "pretrain", ulysses=8),
    # issue 27's other 2-D cases (8 x W/8, as its table): both mixes at W = 16 and 64
    "pretrain_mesh_8x2": Case(16, (32, 8), 131072, "pretrain", ulysses=8),
    "finetune_mesh_8x2": Case(16, (32, 8), 131072, "finetune", ulysses=8),
    "finetune_mesh_8x8": Case(64, (32, 8), 524288, "finetune", ulysses=8),
    # the 8 x 2 cases in 2 head chunks: what the chunks add to every kernel (not in the default run)
    "pretrain_mesh_8x2_chunks_2": Case(16, (32, 8), 131072, "pretrain", ulysses=8, chunks=2),
    "finetune_mesh_8x2_chunks_2": Case(16, (32, 8), 131072, "finetune", ulysses=8, chunks=2),
}


class TransportStream:
    """The simulated transport's copies on a stream of their own, and the Ulysses exchange's
    layout work (packing head groups, concatenating what arrives) on another (each ordered both
    ways with the calling thread's stream), so that the profile tells them apart."""

    def __init__(self, simulated, exchange, all_to_all):
        # exchange: None in a tree without an Exchange class; all_to_all: comm.all_to_all, or None
        self.simulated, self.exchange, self.all_to_all = simulated, exchange, all_to_all
        self.stream, self.exchange_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def __enter__(self):
        ring, shift, exchange = self.simulated.SimulatedRing, self.simulated._SimulatedShift, self.exchange
        self.saved = ring.post, shift.__init__, shift.wait
        # the exchange's layout copies: _run before head chunks (a baseline tree), lay_out, gather and
        # scatter_heads (before 2026-12-08), then the placing of what arrives (comm.all_to_all)
        self.layout = {name: getattr(exchange, name) for name in ("_run", "lay_out", "gather", "scatter_heads") if hasattr(exchange, name)}
        self.placing = getattr(self.all_to_all, "place_arrived", None)

        def on_stream(fn, stream):
            def wrapped(*args, **kwargs):
                caller = torch.cuda.current_stream()
                stream.wait_stream(caller)
                with torch.cuda.stream(stream):
                    result = fn(*args, **kwargs)
                caller.wait_stream(stream)
                return result

            return wrapped

        # a shift copies what it sends when it is posted, and lands it when waited on
        ring.post, shift.__init__, shift.wait = (on_stream(fn, self.stream) for fn in self.saved[:3])
        for name, fn in self.layout.items():
            setattr(exchange, name, on_stream(fn, self.exchange_stream))
        if self.placing is not None:
            self.all_to_all.place_arrived = on_stream(self.placing, self.exchange_stream)
        return self

    def __exit__(self, *exc):
        ring, shift = self.simulated.SimulatedRing, self.simulated._SimulatedShift
        ring.post, shift.__init__, shift.wait = self.saved
        for name, fn in self.layout.items():
            setattr(self.exchange, name, fn)
        if self.placing is not None:
            self.all_to_all.place_arrived = self.placing


def kernel_events(prof):
    from torch.autograd import DeviceType

    return [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def sort_kernels(events, streams: dict[int, str]) -> dict:
    """Kernels by kind: a kind of their own where `streams` names their stream (stream id -> kind)."""
    ms = collections.Counter()
    other: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()
    for e in events:
        us = e.time_range.elapsed_us()
        if getattr(e, "device_resource_id", None) in streams:
            kind = streams[e.device_resource_id]
            if kind == "all_to_all_layout" and e.name.startswith("Memcpy"):  # the copy engine's: no SM
                kind = "all_to_all_layout_copy_engine"
        elif (CUTE_PREFIX in e.name or "flash" in e.name.lower()) and not any(name in e.name for name in RING_HELPER_KERNELS):
            kind = "attention"
        else:
            kind = "other"
            other[e.name] += us
            launches[e.name] += 1
        ms[kind] += us / 1e3
    return {"ms": dict(ms), "other": other, "launches": launches}


def profiled(fn, warmup: int = 1):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def median_sorted(fn, streams: dict[int, str], repeats: int) -> dict:
    """`sort_kernels` of `repeats` profiled calls (after one warm-up): the median ms of each kind;
    the kernel lists of the median call by total."""
    runs = [sort_kernels(kernel_events(profiled(fn, warmup=1 if index == 0 else 0)), streams) for index in range(repeats)]
    runs.sort(key=lambda run: sum(run["ms"].values()))
    middle = runs[len(runs) // 2]
    kinds = {kind for run in runs for kind in run["ms"]}
    middle["ms"] = {kind: statistics.median(run["ms"].get(kind, 0.0) for run in runs) for kind in kinds}
    middle["total_ms_range"] = [sum(runs[0]["ms"].values()), sum(runs[-1]["ms"].values())]
    return middle


def make_inputs(case: Case, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    heads, kv_heads = case.heads
    lead = () if case.mix else (1,)
    shape = lambda h: (*lead, case.tokens, h, HEAD_DIM)  # noqa: E731
    q = torch.randn(shape(heads), device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = (torch.randn(shape(kv_heads), device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(2))
    dout = torch.randn(shape(heads), device="cuda", dtype=torch.bfloat16, generator=generator)
    lengths = lognormal_lengths(case.tokens, case.mix) if case.mix else None
    return q, k, v, dout, lengths


def one_device(case: Case, inputs, deterministic: bool = False) -> dict:
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    q, k, v, dout, lengths = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if lengths is None:
        call = lambda: flash_attn_func(*leaves, causal=True, deterministic=deterministic)  # noqa: E731
    else:
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
        longest = max(lengths)
        call = lambda: flash_attn_varlen_func(  # noqa: E731
            *leaves, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True, deterministic=deterministic,
        )

    def step():
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, leaves, dout)

    return median_sorted(step, {}, ANCHOR_REPEATS)


@dataclass
class RankInputs:
    """Every simulated rank's leaves and dout, made before the profiled calls, so that the whole
    input can be dropped first (a W = 64 mesh holds every rank's on one card)."""

    sharding: object
    shards: list
    lengths: list[int] | None


def rank_inputs(case: Case, inputs, fa4_cp) -> RankInputs:
    q, k, v, dout, lengths = inputs
    world = case.world
    if lengths is None:
        sharding = fa4_cp.Sharding.dense(case.tokens, world, "zigzag")
        seq_dim = 1
    else:
        sharding = document_sharding(fa4_cp, lengths, world // case.ulysses, case.ulysses)
        seq_dim = 0
    if case.ulysses > 1:
        from fa4_cp.plan.mesh_sharding import mesh_sharding

        sharding = mesh_sharding(sharding, case.ulysses)
    # Leaves made before the profiled calls, and gradients taken, not accumulated: the profile
    # holds the attention call's kernels only (no input copies, no .grad adds).
    shards = [
        [*(sharding.shard(t, rank, seq_dim).contiguous().requires_grad_() for t in (q, k, v)), sharding.shard(dout, rank, seq_dim).contiguous()]
        for rank in range(world)
    ]
    return RankInputs(sharding, shards, lengths)


def ring(case: Case, inputs: RankInputs, fa4_cp, deterministic: bool = False) -> dict:
    import importlib

    from fa4_cp.comm import simulated

    exchange = None  # runtime/exchange.py since 2026-12-08, runtime/ulysses.py before, none before that
    for module in ("fa4_cp.runtime.exchange", "fa4_cp.runtime.ulysses"):
        try:
            exchange = importlib.import_module(module).Exchange
            break
        except (ImportError, AttributeError):
            continue
    try:
        all_to_all = importlib.import_module("fa4_cp.comm.all_to_all")
    except ImportError:
        all_to_all = None

    sharding, shards, lengths, world = inputs.sharding, inputs.shards, inputs.lengths, case.world
    cu_seqlens = None if lengths is None else torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)

    def rank_call(group):
        *leaves, dout_ = shards[group.rank]
        options = dict(
            group=group, causal=True, backend="fa4", **({"deterministic": True} if deterministic else {}),
            **({"ulysses_chunks": case.chunks} if case.chunks > 1 else {}),
        )
        out = fa4_cp.ring_attention(*leaves, **options) if lengths is None else fa4_cp.ring_attention_varlen(*leaves, cu_seqlens, **options)
        torch.autograd.grad(out, leaves, dout_)

    ranks = simulated.SimulatedMesh(case.ulysses, world // case.ulysses) if case.ulysses > 1 else simulated.SimulatedRing(world)
    with TransportStream(simulated, exchange, all_to_all) as streams:
        kinds = {profiler_stream_id(streams.stream): "transport", profiler_stream_id(streams.exchange_stream): "all_to_all_layout"}
        result = median_sorted(lambda: ranks.run(rank_call), kinds, REPEATS)
    result["ring_steps"] = len(rank_plan_of(fa4_cp, sharding, case).steps)
    return result


def profiler_stream_id(stream: torch.cuda.Stream) -> int:
    """The id the profiler gives `stream`: read off a copy run on it alone."""
    x = torch.zeros(1024, device="cuda")
    with torch.cuda.stream(stream):
        prof = profiled(lambda: x.clone(), warmup=0)
    (stream_id,) = {getattr(e, "device_resource_id", None) for e in kernel_events(prof)}
    return stream_id


def rank_plan_of(fa4_cp, sharding, case: Case):
    """Rank 0's plan of the ring the call runs (the ring dim's, on a mesh)."""
    from fa4_cp.kernels import BandMask
    from fa4_cp.plan.rows import rank_plan

    ring_sharding = sharding.ring if case.ulysses > 1 else sharding
    return rank_plan(ring_sharding, BandMask(hi=0), 0, torch.device("cuda"))


def summarize(case: Case, one: dict, ring_: dict) -> dict:
    attention, other, transport, layout, layout_copy_engine = (
        ring_["ms"].get(kind, 0.0) for kind in ("attention", "other", "transport", "all_to_all_layout", "all_to_all_layout_copy_engine")
    )
    one_attention, one_all = one["ms"].get("attention", 0.0), sum(one["ms"].values())
    per_rank = max(case.world, 1)
    return {
        "world_size": case.world, "ulysses": case.ulysses, "head_chunks": case.chunks, "heads": list(case.heads), "tokens": case.tokens,
        "mix": case.mix, "ring_steps": ring_["ring_steps"],
        "one_device_ms": one["ms"],
        "one_device_total_ms_range": one["total_ms_range"],
        "ring_total_ms_range": ring_["total_ms_range"],
        "ring_ms": {
            "attention": attention, "other": other, "transport_copies": transport, "all_to_all_layout": layout,
            "all_to_all_layout_copy_engine": layout_copy_engine,
        },
        "attention_vs_one_device": one_attention / attention,
        "all_kernels_vs_one_device": one_all / (attention + other),
        "all_kernels_with_all_to_all_layout_vs_one_device": one_all / (attention + other + layout),
        "non_attention_over_attention": other / attention,
        "other_kernels": [
            {"name": name[:160], "ms": us / 1e3, "launches_per_rank": ring_["launches"][name] / per_rank}
            for name, us in ring_["other"].most_common(15)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=[name for name, case in CASES.items() if case.chunks == 1])
    parser.add_argument("--tree", help="run the fa4_cp of this checkout (a baseline)")
    parser.add_argument("--deterministic", action="store_true", help="the ring calls with deterministic=True")
    add_forward_option_arguments(parser)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fa4_cp = fa4_cp_from(args.tree)
    options = apply_forward_options(args)

    result = record(
        "gpu_work", "cuda", fa4_cp_path=str(Path(fa4_cp.__file__).parent), head_dim=HEAD_DIM, dtype="bfloat16", causal=True,
        method=(
            f"kernel times of one fwd+bwd call (torch.autograd.grad on leaves made beforehand) summed over every simulated rank; "
            f"median of {REPEATS} profiled calls after one warm-up ({ANCHOR_REPEATS} for one device's)"
        ),
        deterministic=args.deterministic, **options, cases={},
    )
    for name in args.cases:
        case = CASES[name]
        began = time.monotonic()
        out_of_memory = None
        try:
            inputs = make_inputs(case)
            one = one_device(case, inputs)
            # beside a deterministic ring, upstream's own deterministic backward: what determinism costs one device
            one_deterministic = one_device(case, inputs, deterministic=True) if args.deterministic else None
            inputs = rank_inputs(case, inputs, fa4_cp)  # the whole input dropped: only the ranks' shards stay
            row = summarize(case, one, ring(case, inputs, fa4_cp, args.deterministic))
            if one_deterministic is not None:
                row["one_device_deterministic_ms"] = one_deterministic["ms"]
                row["upstream_deterministic_vs_default"] = sum(one["ms"].values()) / sum(one_deterministic["ms"].values())
                # the default ring in the same run: what determinism costs the ring, free of the anchor's drift
                default = ring(case, inputs, fa4_cp)["ms"]
                row["default_ring_ms"] = {kind: default.get(kind, 0.0) for kind in ("attention", "other")}
                row["deterministic_vs_default"] = sum(row["default_ring_ms"].values()) / (row["ring_ms"]["attention"] + row["ring_ms"]["other"])
        except torch.OutOfMemoryError as error:  # a simulated W = 64 holds every rank on one card: say so, go on
            out_of_memory = str(error).splitlines()[0]
        inputs = None
        # a case's simulated ranks (their threads, transports and buffers; a failed call's frames
        # and exception) sit in reference cycles: collect them, or the next case starts with their
        # memory still allocated (session 29: pretraining-like 8 x 8 ran out of memory after
        # fine-tuning-like 8 x 8 in one process; after the W = 8 and 16 cases it had fitted in session 28)
        gc.collect()
        torch.cuda.empty_cache()
        if out_of_memory is not None:
            result["cases"][name] = {"world_size": case.world, "out_of_memory": out_of_memory}
            write(result, args.out)
            print(f"{name:18} W={case.world:<3} out of GPU memory, left out", flush=True)
            continue
        row["seconds"] = time.monotonic() - began
        result["cases"][name] = row
        write(result, args.out)
        print(
            f"{name:18} W={case.world:<3} attention {row['attention_vs_one_device']:.3f}  all kernels {row['all_kernels_vs_one_device']:.3f}  "
            f"non-attention/attention {row['ring_ms']['other']:.1f}/{row['ring_ms']['attention']:.1f} ms  "
            f"transport {row['ring_ms']['transport_copies']:.1f} ms  all-to-all layout {row['ring_ms']['all_to_all_layout']:.1f} ms "
            f"(+ {row['ring_ms']['all_to_all_layout_copy_engine']:.1f} ms copy engine)  "
            + (
                f"deterministic {row['deterministic_vs_default']:.3f}x the default ring, upstream's {row['upstream_deterministic_vs_default']:.3f}x its own  "
                if args.deterministic else ""
            )
            + f"({row['seconds']:.0f} s)", flush=True,
        )


if __name__ == "__main__":
    main()
