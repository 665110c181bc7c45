"""Checkpoints with torch.distributed.checkpoint: the sharded model and optimizer (DCP, any rank
count can read them back), plus the step, LR scheduler, data position, configuration fingerprint
(meta.pt, written last so that a checkpoint without it is incomplete) and every rank's RNG."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from config import TrainConfig

META = "meta.pt"


def step_dir(root: str, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_step(root: str) -> int | None:
    """The last step with a complete checkpoint under `root`."""
    steps = [int(p.name.removeprefix("step_")) for p in Path(root).glob("step_*") if (p / META).exists()]
    return max(steps, default=None)


def read_meta(root: str, step: int) -> dict:
    return torch.load(step_dir(root, step) / META, weights_only=False)


def check_resumable(config: TrainConfig, world_size: int, meta: dict, root: str) -> None:
    """A checkpoint of another configuration is refused before anything heavy is built."""
    mine = {**config.fingerprint(), "world_size": world_size}
    differing = {key: (meta["config"].get(key), value) for key, value in mine.items() if meta["config"].get(key) != value}
    if differing:
        details = "; ".join(f"{key}: checkpoint {theirs!r}, this run {ours!r}" for key, (theirs, ours) in differing.items())
        raise ValueError(f"checkpoint_dir: the checkpoint in {root} is from another configuration ({details})")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(root: str, step: int, model, optimizer, scheduler, data_state: dict, config: TrainConfig) -> None:
    """Collective. `step` is the number of completed steps."""
    path = step_dir(root, step)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        meta = {
            "step": step, "scheduler": scheduler.state_dict(), "data": data_state,
            "config": {**config.fingerprint(), "world_size": world_size},
        }
        torch.save(meta, path / f"{META}.tmp")
        os.replace(path / f"{META}.tmp", path / META)
    dist.barrier()


def load(root: str, step: int, model, optimizer, scheduler) -> dict:
    """Collective: restores model, optimizer, scheduler and this rank's RNG; returns the meta."""
    path = step_dir(root, step)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = read_meta(root, step)
    scheduler.load_state_dict(meta["scheduler"])
    rng = torch.load(path / f"rng_rank{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return meta
