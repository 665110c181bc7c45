"""Run a function on W processes, one GPU each, over NCCL, with a hard timeout.

The test spawns the ranks itself rather than through torchrun: torchrun stops every rank as soon
as one fails, which would hide what the fault tests check (how the surviving ranks end).
Multicast stays off in every rank (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class RankOutcome:
    status: str  # "ok", "error", or "exited" (no result: the process ended by itself)
    value: Any
    exitcode: int | None
    stderr: str


def _worker(fn, rank, world_size, init_file, pg_timeout, env, stderr_path, result_path, results, args) -> None:
    os.environ.update({**NO_MULTICAST, **env})
    sys.stderr = open(stderr_path, "w", buffering=1)
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    try:
        dist.init_process_group(
            "nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout), device_id=torch.device("cuda", rank),
        )
        # Through a file: tensors sent through the queue vanish with their process.
        torch.save(fn(rank, world_size, *args), result_path)
        results.put((rank, "ok", result_path))
    except BaseException as error:  # noqa: BLE001 - sent to the parent
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        return
    dist.destroy_process_group()


def run_nccl(fn: Callable, world_size: int, tmp_path, *args, timeout: float = 600.0, pg_timeout: float = 120.0,
             env: dict[str, str] | None = None) -> list[RankOutcome]:
    """Every rank's outcome; ranks still running after `timeout` seconds are killed (status "hung")."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_file = os.path.join(tmp_path, f"nccl-init-{world_size}")
    stderr_paths = [os.path.join(tmp_path, f"rank{rank}.stderr") for rank in range(world_size)]
    processes = [
        context.Process(
            target=_worker,
            args=(fn, rank, world_size, init_file, pg_timeout, env or {}, stderr_paths[rank], os.path.join(tmp_path, f"rank{rank}.pt"), results, args),
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    collected: dict[int, tuple[str, Any]] = {}
    while len(collected) < world_size and any(p.is_alive() for p in processes) and datetime.datetime.now() < deadline:
        try:
            rank, status, value = results.get(timeout=1.0)
            collected[rank] = (status, value)
        except queue.Empty:
            pass
    while not results.empty():
        rank, status, value = results.get()
        collected[rank] = (status, value)
    outcomes = []
    for rank, process in enumerate(processes):
        process.join(timeout=max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = process.is_alive()
        if hung:
            process.kill()
            process.join()
        status, value = collected.get(rank, ("hung" if hung else "exited", None))
        if status == "ok":
            value = torch.load(value, weights_only=False)
        with open(stderr_paths[rank]) as stderr:
            outcomes.append(RankOutcome(status, value, process.exitcode, stderr.read()))
    return outcomes
