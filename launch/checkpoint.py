"""Checkpoints with torch.distributed.checkpoint: the sharded model and optimizer (DCP, any rank
count can read them back), plus the step, LR scheduler, data position, configuration fingerprint
(meta.json, written last so that a checkpoint without it is incomplete) and every rank's RNG.

Nothing arbitrary is unpickled on resume, so a checkpoint directory from elsewhere cannot run
code: the meta is JSON, RNG states are plain tensors read with torch.load(weights_only=True)
(Python's own RNG state goes into JSON as numbers), and DCP's own `.metadata` pickle is read by
a storage reader of ours (`TrustedMetadataReader`), whose unpickler resolves only an exact list
of names: DCP's metadata classes, torch.Size, dtypes, layouts and paths. Anything else, a dotted
name included, is refused before it is called, and the object checked is the object DCP uses.
(torch's weights_only unpickler would be the natural choice, but it cannot read the protocol-4
pickle DCP writes: it stops at the first FRAME opcode.)
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from config import TrainConfig

META = "meta.json"


def step_dir(root: str, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_steps(root: str) -> list[int]:
    """Steps with a complete checkpoint under `root`, oldest first."""
    return sorted(int(p.name.removeprefix("step_")) for p in Path(root).glob("step_*") if (p / META).exists())


def latest_step(root: str) -> int | None:
    """The last step with a complete checkpoint under `root`."""
    return max(complete_steps(root), default=None)


def read_meta(root: str, step: int) -> dict:
    return json.loads((step_dir(root, step) / META).read_text())


def check_resumable(config: TrainConfig, world_size: int, meta: dict, root: str) -> None:
    """A checkpoint of another configuration is refused before anything heavy is built."""
    mine = {**config.fingerprint(), "world_size": world_size}
    differing = {key: (meta["config"].get(key), value) for key, value in mine.items() if meta["config"].get(key) != value}
    if differing:
        details = "; ".join(f"{key}: checkpoint {theirs!r}, this run {ours!r}" for key, (theirs, ours) in differing.items())
        raise ValueError(f"checkpoint_dir: the checkpoint in {root} is from another configuration ({details})")


def schedule_changes(config: TrainConfig, meta: dict) -> list[str]:
    """How this run's LR schedule differs from the checkpoint's (allowed: the run says so)."""
    theirs = meta.get("schedule", {})
    return [f"{key}: checkpoint {theirs.get(key)!r}, this run {value!r}" for key, value in config.schedule().items() if theirs.get(key) != value]


_TRUSTED_NAMES: dict[tuple[str, str], object] = {
    **{
        (dcp_metadata.__name__, name): getattr(dcp_metadata, name)
        for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
            "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
        )
    },
    (dcp_filesystem.__name__, "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    **{("pathlib", name): getattr(pathlib, name) for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}
"""Every name DCP's metadata pickle refers to, and nothing else: classes whose instances only
hold data, and constructors of sizes, enums, layouts and paths."""


class _TrustedNames(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _TRUSTED_NAMES[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata") from None


def load_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's metadata pickle at `path`, unpickled through `_TrustedNames`; ValueError naming the
    file for anything else."""
    try:
        with open(path, "rb") as stream:
            metadata = _TrustedNames(stream).load()
    except (pickle.UnpicklingError, EOFError, OSError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"checkpoint_dir: refusing {path}: {error}") from error
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"checkpoint_dir: refusing {path}: it holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


class TrustedMetadataReader(dcp.FileSystemReader):
    """DCP's file-system reader whose metadata comes through `load_dcp_metadata`, read when the
    reader is made (a refusal is a ValueError naming the file, before DCP starts) and handed to
    DCP as it was checked."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.metadata = load_dcp_metadata(Path(self._get_metadata_path()))

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = dcp_metadata.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


def read_rng(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], tuple]:
    """This rank's torch/CUDA RNG tensors and Python RNG state; nothing but tensors is unpickled."""
    try:
        tensors = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"checkpoint_dir: refusing {path / f'rng_rank{rank}.pt'}: {error}") from error
    version, internal, gauss = json.loads((path / f"python_rng_rank{rank}.json").read_text())
    return tensors, (version, tuple(internal), gauss)


def _rng_tensors() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save(root: str, step: int, model, optimizer, scheduler, data_state: dict, config: TrainConfig) -> None:
    """Collective. `step` is the number of completed steps. With `config.keep_checkpoints`, older
    complete checkpoints beyond that many are removed afterwards."""
    path = step_dir(root, step)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.save(_rng_tensors(), path / f"rng_rank{rank}.pt")
    (path / f"python_rng_rank{rank}.json").write_text(json.dumps(_python_rng_to_json(random.getstate())))
    dist.barrier()
    if rank == 0:
        meta = {
            "step": step, "scheduler": scheduler.state_dict(), "data": data_state, "schedule": config.schedule(),
            "config": {**config.fingerprint(), "world_size": world_size},
        }
        (path / f"{META}.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(path / f"{META}.tmp", path / META)
        if config.keep_checkpoints:
            for old in complete_steps(root)[: -config.keep_checkpoints]:
                shutil.rmtree(step_dir(root, old))
    dist.barrier()


def load(root: str, step: int, model, optimizer, scheduler) -> dict:
    """Collective: restores model, optimizer, scheduler and this rank's RNG; returns the meta."""
    path = step_dir(root, step)
    rng, python_rng = read_rng(path, dist.get_rank())
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=TrustedMetadataReader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = read_meta(root, step)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(python_rng)
    return meta
