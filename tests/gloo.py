"""Run a function on W gloo processes (spawned), with a hard timeout so that a hang fails the test."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import traceback
from collections.abc import Callable
from typing import Any


def _worker(fn: Callable, rank: int, world_size: int, init_file: str, pg_timeout: float, results, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as error:  # noqa: BLE001 - sent to the parent
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable, world_size: int, tmp_path, *args, timeout: float = 240.0, pg_timeout: float = 60.0) -> list[tuple[str, Any]]:
    """(status, value) per rank: ("ok", fn's result) or ("error", the traceback text).

    Processes still running after `timeout` seconds are killed and the call raises TimeoutError.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_file = os.path.join(tmp_path, f"gloo-init-{world_size}")
    processes = [
        context.Process(target=_worker, args=(fn, rank, world_size, init_file, pg_timeout, results, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            collected[rank] = (status, value)
    except Exception as error:
        raise TimeoutError(f"gloo ranks {sorted(set(range(world_size)) - set(collected))} gave no result within {timeout}s") from error
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world_size)]
