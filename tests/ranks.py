"""Run a function on W processes, gloo on CPU or NCCL with one GPU each, with a hard timeout.

The test spawns the ranks itself rather than through torchrun: torchrun stops every rank as soon
as one fails, which would hide what the fault tests check (how the surviving ranks end). Results
come back through files (tensors sent through a queue vanish with their process). With NCCL,
multicast stays off in every rank (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).

Gloo ranks are forked from a server process that has imported torch and fa4_cp once (the
"forkserver" start method): each is still a fresh process, but starts in milliseconds where a
spawned one spends about 3 s of CPU importing, most of the CPU suite's multi-process time. NCCL
ranks are spawned, as before: nothing of CUDA's is shared with a server that outlives a test.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PRELOADED = ["torch", "torch.distributed", "torch._dynamo", "fa4_cp"]  # what every gloo rank imports first


def _start_method(backend: str) -> multiprocessing.context.BaseContext:
    if backend != "gloo":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    return context


@dataclass
class RankOutcome:
    status: str  # "ok", "error", "exited" (no result: the process ended by itself) or "hung"
    value: Any  # fn's result, or the traceback text
    exitcode: int | None
    stderr: str


def _worker(fn, rank, world_size, backend, init_file, pg_timeout, env, stderr_path, result_path, results, args) -> None:
    # the caller's environment as it is now (a forked rank would otherwise keep the server's)
    os.environ.clear()
    os.environ.update(env)
    sys.stderr = open(stderr_path, "w", buffering=1)
    import torch
    import torch.distributed as dist

    options = {}
    if backend == "nccl":
        os.environ.update(NO_MULTICAST)
        torch.cuda.set_device(rank)
        options["device_id"] = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout), **options,
        )
        torch.save(fn(rank, world_size, *args), result_path)
        results.put((rank, "ok"))
    except BaseException as error:  # noqa: BLE001 - sent to the parent
        with open(result_path, "w") as failure:
            failure.write(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        results.put((rank, "error"))
        return
    dist.destroy_process_group()


def run_ranks(
    fn: Callable, world_size: int, tmp_path, *args, backend: str = "gloo", timeout: float = 240.0,
    pg_timeout: float = 60.0, env: dict[str, str] | None = None,
) -> list[RankOutcome]:
    """Every rank's outcome; ranks still running after `timeout` seconds are killed ("hung")."""
    import torch

    context = _start_method(backend)
    results = context.Queue()
    tag = f"{backend}-{world_size}-{uuid.uuid4().hex[:8]}"  # a file rendezvous may not be reused
    init_file = os.path.join(tmp_path, f"init-{tag}")
    paths = [(os.path.join(tmp_path, f"rank{rank}-{tag}.stderr"), os.path.join(tmp_path, f"rank{rank}-{tag}.result")) for rank in range(world_size)]
    processes = [
        context.Process(
            target=_worker,
            args=(fn, rank, world_size, backend, init_file, pg_timeout, {**os.environ, **(env or {})}, *paths[rank], results, args),
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    collected: dict[int, str] = {}
    while len(collected) < world_size and any(p.is_alive() for p in processes) and datetime.datetime.now() < deadline:
        try:
            rank, status = results.get(timeout=0.5)
            collected[rank] = status
        except queue.Empty:
            pass
    while not results.empty():
        rank, status = results.get()
        collected[rank] = status
    outcomes = []
    for rank, process in enumerate(processes):
        process.join(timeout=max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = process.is_alive()
        if hung:
            process.kill()
            process.join()
        status = collected.get(rank, "hung" if hung else "exited")
        stderr_path, result_path = paths[rank]
        value = None
        if status == "ok":
            value = torch.load(result_path, weights_only=False)
        elif status == "error":
            with open(result_path) as failure:
                value = failure.read()
        with open(stderr_path) as stderr:
            outcomes.append(RankOutcome(status, value, process.exitcode, stderr.read()))
    return outcomes


def values(outcomes: list[RankOutcome]) -> list[Any]:
    """Every rank's result; fails the test with each failed rank's traceback and stderr."""
    failed = [(rank, o.status, o.value, o.stderr[-3000:]) for rank, o in enumerate(outcomes) if o.status != "ok"]
    assert not failed, "\n".join(f"rank {rank} {status}:\n{value}\n{stderr}" for rank, status, value, stderr in failed)
    return [o.value for o in outcomes]
