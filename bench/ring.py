"""Ring scaling benchmark on the GPUs of one node: fa4_cp's ring against one GPU and torch's own CP.

    torchrun --nproc-per-node W bench/ring.py [--quick] [--profile] [--out bench/results/ring_<gpu>_<date>_w<W>.json]
    torchrun --nproc-per-node 2 bench/ring.py --device cpu --seq-per-gpu 256 --heads 4:2 --head-dim 32   (logic smoke test)

For each (heads, S per GPU, mode) with causal attention, batch 1: fa4_cp.ring_attention with each
transport; the same kernels on one GPU over the whole sequence (a ring of one, every rank at once
on its own GPU, rank 0 reported); torch's context_parallel with SDPA (bench/ring_baseline.py).
A time is the median over timed calls of the slowest rank's CUDA-event time (barrier before each
call). Derived: efficiency = T_single / (W * T_ring), speedup = T_torch / T_ring, TFLOPs per GPU
(causal: 2·b·S²·h·d forward, 3.5x that forward + backward). `--profile` adds where the time of
one configuration goes (bench/ring_profile.py). Rank 0 rewrites the JSON after each configuration.
On CPU: gloo and the reference backend, no baseline, no profile, no memory figures.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fa4_cp  # noqa: E402
from fa4_cp.comm.group import resolve_group  # noqa: E402
from fa4_cp.comm.transport import ring_buffer_bytes  # noqa: E402
from common import RESULTS, record, today, write  # noqa: E402
from common import device_name as device_label  # noqa: E402
from ring_baseline import torch_context_parallel  # noqa: E402
from ring_profile import profile_calls  # noqa: E402
from ring_timing import attempt, measure  # noqa: E402

DTYPE = torch.bfloat16
REQUIRED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
PROFILE_CONFIG = {"heads": "32:8", "seq_per_gpu": 8192, "mode": "fwdbwd", "iters": 5}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="S/GPU 8K and 32K, heads 32:8, fewer timed calls")
    parser.add_argument("--seq-per-gpu", type=int, nargs="+", help="default 8192 32768 131072 (quick: 8192 32768)")
    parser.add_argument("--heads", nargs="+", help="q:kv heads, default 32:32 32:8 (quick: 32:8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    parser.add_argument("--transports", nargs="+", choices=["copy_engine", "nccl"], default=["copy_engine", "nccl"])
    parser.add_argument("--torch-sdpa", choices=["cudnn", "flash", "efficient"], default="cudnn", help="SDPA backend of the torch baseline")
    parser.add_argument("--no-consistency-check", action="store_true", help="time ring calls without fa4_cp's cross-rank check")
    parser.add_argument("--profile", action="store_true", help="profile S/GPU 8K, heads 32:8, fwdbwd with each transport")
    parser.add_argument("--out", help="JSON path (default bench/results/ring_<device>_<date>_w<W>.json)")
    args = parser.parse_args()
    args.seq_per_gpu = args.seq_per_gpu or ([8192, 32768] if args.quick else [8192, 32768, 131072])
    args.heads = [tuple(int(n) for n in pair.split(":")) for pair in args.heads or (["32:8"] if args.quick else ["32:32", "32:8"])]
    return args


def init(device_kind: str) -> torch.device:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_kind == "cpu":
        dist.init_process_group("gloo")
        return torch.device("cpu")
    wrong = {name: os.environ.get(name) for name, value in REQUIRED_ENV.items() if os.environ.get(name) != value}
    if world_size > 1 and wrong:
        sys.exit(f"bench/ring.py: set {' '.join(f'{n}={v}' for n, v in REQUIRED_ENV.items())} for multi-GPU runs (found {wrong})")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def iterations(tokens_per_gpu: int, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) calls; the first warm-up call of a new shape compiles FA4's kernels."""
    if tokens_per_gpu >= 262144:  # one GPU over the whole of a long sequence: long calls, little spread
        return 1, 3
    timed = 20 if tokens_per_gpu <= 8192 else 10 if tokens_per_gpu <= 32768 else 5
    return 3, (max(3, timed // 4) if quick else timed)


def ring_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None, **ring_kwargs) -> Callable[[], None]:
    def call() -> None:
        out = fa4_cp.ring_attention(q, k, v, causal=True, **ring_kwargs)
        if dout is not None:
            out.backward(dout)
            q.grad = k.grad = v.grad = None

    return call


def ring_inputs(shape: tuple[int, ...], backward: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random local shards q (b, s_local, h, d), k, v (b, s_local, h_kv, d) and dout (None for
    the forward alone): the cost of attention does not depend on the values."""
    batch, heads, kv_heads, seq_local, dim = shape
    q = torch.randn(batch, seq_local, heads, dim, device=device, dtype=DTYPE, requires_grad=backward)
    k, v = (torch.randn(batch, seq_local, kv_heads, dim, device=device, dtype=DTYPE, requires_grad=backward) for _ in range(2))
    return q, k, v, torch.randn_like(q) if backward else None


def time_ours(shape: tuple[int, ...], backward: bool, group, transport: str | None, backend: str, iters: tuple[int, int], device: torch.device) -> dict:
    """fa4_cp.ring_attention over `group` (None: the world) for `shape` (b, h, h_kv, s_local, d)."""
    q, k, v, dout = ring_inputs(shape, backward, device)
    call = ring_call(q, k, v, dout, group=group, transport=transport, backend=backend)
    result = measure(call, warmup=iters[0], iters=iters[1], device=device, group=group)
    result["ring_buffer_bytes"] = ring_buffer_bytes(resolve_group(group).transport(transport or "auto", device))
    result["input_bytes"] = sum(t.nbytes for t in (q, k, v)) + (dout.nbytes if backward else 0)
    result["output_bytes"] = q.nbytes + (q.nbytes + k.nbytes + v.nbytes if backward else 0)
    return result


def run_config(args: argparse.Namespace, heads: tuple[int, int], seq_local: int, mode: str, single_group, mesh, device: torch.device) -> dict:
    world_size, backward = dist.get_world_size(), mode == "fwdbwd"
    seq = seq_local * world_size
    backend = "fa4" if device.type == "cuda" else "reference"
    ring_iters, single_iters = iterations(seq_local, args.quick), iterations(seq, args.quick)
    contenders = {}
    for transport in args.transports:
        run = functools.partial(time_ours, (1, *heads, seq_local, args.head_dim), backward, None, transport, backend, ring_iters, device)
        contenders[f"ours_{transport}"] = attempt(run, device)
    run = functools.partial(time_ours, (1, *heads, seq, args.head_dim), backward, single_group, None, backend, single_iters, device)
    single = attempt(run, device)
    if "ms" in single:  # every rank ran its own; rank 0 is reported, the others shown
        per_rank: list = [None] * world_size
        dist.all_gather_object(per_rank, single["ms"])
        single["ms_per_rank"] = per_rank
    contenders["single"] = single
    if mesh is None:
        contenders["torch_cp"] = {"error": "skipped: cpu"}
    else:
        shape = (1, heads[0], heads[1], seq, args.head_dim)
        contenders["torch_cp"] = torch_context_parallel(mesh, shape, DTYPE, backward, args.torch_sdpa, *ring_iters, device)

    flops = 4 * seq * seq * heads[0] * args.head_dim / 2 * (3.5 if backward else 1)
    ms = {name: c.get("ms") for name, c in contenders.items()}
    rings = {t: ms[f"ours_{t}"] for t in args.transports}
    return {
        "heads": heads[0], "kv_heads": heads[1], "seq_per_gpu": seq_local, "seq_total": seq, "mode": mode,
        "iterations": {"ring_and_torch": ring_iters, "single": single_iters},
        "ms": ms,
        "efficiency": {t: ms["single"] / (world_size * r) if ms["single"] and r else None for t, r in rings.items()},
        "speedup_vs_torch": {t: ms["torch_cp"] / r if ms["torch_cp"] and r else None for t, r in rings.items()},
        "tflops_per_gpu": {
            name: flops / (1 if name == "single" else world_size) / (t * 1e-3) / 1e12 if t else None for name, t in ms.items()
        },
        "contenders": contenders,
    }


def profile(args: argparse.Namespace, out_path: str, device: torch.device) -> dict:
    """Rank 0's and the slowest rank's profile summary of one configuration, per transport."""
    heads = tuple(int(n) for n in PROFILE_CONFIG["heads"].split(":"))
    seq_local, backward = PROFILE_CONFIG["seq_per_gpu"], PROFILE_CONFIG["mode"] == "fwdbwd"
    summaries = {}
    for transport in args.transports:
        trace = f"{os.path.splitext(out_path)[0]}_trace_{transport}.json" if dist.get_rank() == 0 else None

        def run(transport=transport, trace=trace) -> dict:
            q, k, v, dout = ring_inputs((1, *heads, seq_local, args.head_dim), backward, device)
            call = ring_call(q, k, v, dout, transport=transport, backend="fa4")
            for _ in range(3):  # warm-up: compile, buffers
                call()
            return profile_calls(call, iters=PROFILE_CONFIG["iters"], device=device, trace_path=trace)

        mine = attempt(run, device)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        slowest = max(everyone, key=lambda s: s.get("wall_ms_median") or 0)
        summaries[transport] = {"rank0": everyone[0], "slowest_rank": slowest}
    return {"config": PROFILE_CONFIG | {"head_dim": args.head_dim}, "by_transport": summaries}


def print_table(results: list[dict], transports: list[str]) -> None:
    def cell(value, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    ring_heads = " ".join(f"{'ms ' + t[:4]:>9}" for t in transports)
    eff_heads = " ".join(f"{'eff ' + t[:4]:>9}" for t in transports)
    torch_heads = " ".join(f"{'x torch ' + t[:4]:>12}" for t in transports)
    print(f"{'heads':>6} {'S/GPU':>7} {'mode':>6} {ring_heads} {'ms single':>9} {'ms torch':>9} {eff_heads} {torch_heads}")
    for r in results:
        print(
            f"{r['heads']:>3}:{r['kv_heads']:<2} {r['seq_per_gpu']:>7} {r['mode']:>6} "
            + " ".join(f"{cell(r['ms'][f'ours_{t}'], '.2f'):>9}" for t in transports)
            + f" {cell(r['ms']['single'], '.2f'):>9} {cell(r['ms']['torch_cp'], '.2f'):>9} "
            + " ".join(f"{cell(r['efficiency'][t], '.1%'):>9}" for t in transports)
            + " "
            + " ".join(f"{cell(r['speedup_vs_torch'][t], '.2f'):>12}" for t in transports)
        )


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    args = parse_args()
    device = init(args.device)
    fa4_cp.set_consistency_check(not args.no_consistency_check)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device_name = device_label(device)
    out_path = args.out or os.path.join(RESULTS, f"ring_{device_name.lower().replace(' ', '_')}_{today()}_w{world_size}.json")
    single_group, _ = dist.new_subgroups(group_size=1)  # collective: a ring of one per rank
    mesh = None
    if device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (world_size,), mesh_dim_names=("cp",))
    result = record(
        "ring", device,
        gpus=world_size,
        flash_attn_4=package_version("flash-attn-4"),
        env={name: os.environ.get(name) for name in REQUIRED_ENV},
        settings={
            "causal": True, "batch": 1, "dtype": "bfloat16", "head_dim": args.head_dim, "heads": [f"{h}:{kv}" for h, kv in args.heads],
            "seq_per_gpu": args.seq_per_gpu, "modes": args.modes, "transports": args.transports, "quick": args.quick,
            "backend": "fa4" if device.type == "cuda" else "reference (cpu; transport ignored, gloo)",
            "consistency_check": not args.no_consistency_check, "torch_sdpa": args.torch_sdpa, "layout": "zigzag",
            "statistic": "median over timed calls of the slowest rank's time (barrier before each call); "
            + ("CUDA events" if device.type == "cuda" else "perf_counter"),
            "memory": "per GPU: before = allocated before the call, extra = peak - before (outputs included); "
            "ring_buffer_bytes = fa4_cp's persistent KV/dKV buffers (allocated once, so outside extra; copy_engine's are "
            "symmetric memory, in before only where torch allocates it through its caching allocator); torch_cp's before includes the full-sequence "
            "q/k/v storages that context_parallel shrinks in place (resize_ keeps the storage)",
        },
        results=[],
    )
    for heads in args.heads:
        for seq_local in args.seq_per_gpu:
            for mode in args.modes:
                result["results"].append(run_config(args, heads, seq_local, mode, single_group, mesh, device))
                if rank == 0:
                    write(result, out_path)
    if args.profile:
        result["profile"] = profile(args, out_path, device) if device.type == "cuda" else "skipped: cpu"
    if rank == 0:
        write(result, out_path)
        print_table(result["results"], args.transports)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
