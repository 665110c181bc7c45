"""One ring hop's bandwidth through each GPU transport (torchrun, 2+ GPUs).

Every rank shifts a buffer one rank on through `Transport.shift` on the comm stream, as the ring
does; the time of a hop is the slowest rank's, CUDA events, median over timed hops after warm-up.
GiB/s counts the bytes one GPU sends (= receives) per hop.

torchrun --nproc-per-node 2 bench/transport_bandwidth.py --out bench/results/<name>.json
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
from common import record, write

from fa4_cp.comm.group import release_transports, resolve_group
from fa4_cp.comm.streams import post_hop
from fa4_cp.comm.watchdog import Hop

SIZES_MIB = (16, 64, 256)


def hop_ms(transport, send: torch.Tensor, recv: torch.Tensor, warmup: int, iters: int) -> float:
    samples = []
    for index in range(warmup + iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        post_hop(transport, [send], [recv], 1, 0, Hop("bandwidth", 0, 1, transport.rank, transport.world_size)).arrive()
        end.record()
        end.synchronize()
        if index >= warmup:
            samples.append(start.elapsed_time(end))
    slowest = torch.tensor(samples, dtype=torch.float64, device=send.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    results = []
    for kind in ("copy_engine", "nccl"):
        transport = resolve_group(None).transport(kind, device)
        for mib in SIZES_MIB:
            send = torch.randn(mib << 19, dtype=torch.bfloat16, device=device)
            (recv,) = transport.buffers(0, 1, tuple(send.shape), send.dtype, device)
            ms = hop_ms(transport, send, recv, warmup=5, iters=20)
            expected = torch.empty_like(send)
            dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, send, (dist.get_rank() + 1) % dist.get_world_size()),
                 dist.P2POp(dist.irecv, expected, (dist.get_rank() - 1) % dist.get_world_size())]
            )[0].wait()
            torch.cuda.synchronize()
            results.append({"transport": kind, "mib": mib, "ms": ms, "gib_per_s": mib / 1024 / (ms / 1e3), "data_ok": torch.equal(recv, expected)})
        torch.cuda.synchronize()
        release_transports()
    if dist.get_rank() == 0:
        result = record(
            "transport_bandwidth", device, gpus=dist.get_world_size(),
            statistic="median of 20 hops after 5 warm-up, slowest rank, CUDA events", results=results,
        )
        write(result, args.out)
        for r in results:
            print(f"{r['transport']:>12} {r['mib']:>5} MiB {r['ms']:8.3f} ms {r['gib_per_s']:7.1f} GiB/s data_ok={r['data_ok']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
