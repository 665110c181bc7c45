"""The Ulysses x ring splits of one context-parallel group, one chosen per batch.

    splits = ContextSplits(mesh["cp"], heads=32, kv_heads=8, head_dim=128)        # ulysses="auto"
    choice = splits.choose(cu_seqlens, seq_len)                                   # per batch
    local = fa4_cp.shard_inputs(input_ids, labels, group=choice.group, cu_seqlens=cu_seqlens)

Every split of the cp ranks that the heads allow is made at construction: a 2-D mesh with dims
"ring" and "ulysses" (ulysses innermost, the nearest ranks) over the cp dim of the cp mesh's root
mesh, which every rank of the root makes together (collective, like any DeviceMesh); u = 1 is the
cp dim itself. `choose` is fa4_cp.plan_mesh's fastest split for the batch's documents (a model,
tuning/mesh_model.py), or the one fixed split; the ranks of a cp group see the same batch, so
they choose the same split without a word. launch/train.py, the accelerate plugin and the
torchtitan batch sharding take one.

Placing a batch's documents is host work (plan_mesh 0.15 s for a fine-tuning-like batch at
W = 64-72 on a slow host, which places only the splits that can win), and so is working out what its ring's streams carry (up to 0.1
s for a pretraining-like one at W = 72): `plan_ahead` starts both for a coming batch on a worker
thread, while the GPU runs the current step, and `choose`, `fa4_cp.shard_inputs` and the ring's
first call then find them cached.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..kernels import BandMask
from ..plan.placement import balanced_sharding, placement_heads
from ..plan.schedule import band_interval
from ..plan.span_rows import span_streams
from ..tuning.mesh_model import plan_mesh
from ..validation import check_cu_seqlens, heads_split


def split_cp_dim(cp_mesh: DeviceMesh, ulysses: int) -> DeviceMesh:
    """The ranks of a 1-D cp mesh as a (ring, ulysses) mesh, u ulysses ranks innermost; the
    other dims of its root mesh stay as they are (collective: every rank of the root makes it)."""
    cp_size = cp_mesh.size()
    if ulysses < 1 or cp_size % ulysses:
        raise ValueError(f"ulysses: {ulysses} must divide the cp size {cp_size}")
    root = cp_mesh._get_root_mesh() if hasattr(cp_mesh, "_get_root_mesh") else cp_mesh
    names = list(root.mesh_dim_names or ())
    cp_name = (cp_mesh.mesh_dim_names or (None,))[0]
    if cp_name not in names:
        raise ValueError(f"cp_mesh: expected a named dim of a DeviceMesh, got dims {cp_mesh.mesh_dim_names}")
    cp = names.index(cp_name)
    shape = list(root.mesh.shape)
    ranks = root.mesh.reshape(*shape[:cp], cp_size // ulysses, ulysses, *shape[cp + 1 :])
    names[cp : cp + 1] = ["ring", "ulysses"]
    return DeviceMesh(root.device_type, ranks, mesh_dim_names=tuple(names))["ring", "ulysses"]


class SplitChoice(NamedTuple):
    """The split chosen for one batch."""

    ulysses: int
    group: DeviceMesh
    """The (ring, ulysses) mesh for ring_attention's `group`; the cp mesh itself where ulysses is 1."""
    head_chunks: int
    """plan_mesh's head chunks, for ring_attention's `ulysses_chunks`: 1 where the split was asked
    for or is the plain ring."""


class ContextSplits:
    """The groups of one cp mesh's Ulysses x ring splits: `groups[u]`, every u the heads allow
    (`ulysses="auto"`) or the one asked for."""

    def __init__(self, cp_mesh: DeviceMesh, *, heads: int, kv_heads: int, head_dim: int, ulysses: int | str = "auto"):
        self.cp_size, self.heads, self.kv_heads, self.head_dim = cp_mesh.size(), heads, kv_heads, head_dim
        self.auto = ulysses == "auto"
        if not self.auto and (isinstance(ulysses, bool) or not isinstance(ulysses, int)):
            raise ValueError(f"ulysses: expected a count or 'auto', got {ulysses!r}")
        if not self.auto and (ulysses < 1 or self.cp_size % ulysses):
            raise ValueError(f"ulysses: {ulysses} must divide the cp size {self.cp_size}")
        if not self.auto and not heads_split(heads, kv_heads, ulysses):
            raise ValueError(f"ulysses: {ulysses} ranks cannot share {heads} q heads and {kv_heads} KV heads")
        wanted = [u for u in range(1, self.cp_size + 1) if self.cp_size % u == 0] if self.auto else [ulysses]
        self.groups: dict[int, DeviceMesh] = {
            u: cp_mesh if u == 1 else split_cp_dim(cp_mesh, u) for u in wanted if heads_split(heads, kv_heads, u)
        }
        self._planner: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[int, ...], int, Future] | None = None  # (documents, seq_len, the split chosen for them)

    def plan_ahead(
        self, cu_seqlens: torch.Tensor | None, seq_len: int, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
    ) -> None:
        """Start placing a coming batch's documents (packed `cu_seqlens`, on the CPU) on a worker
        thread, for every split `choose` weighs, and working out the chosen split's streams under
        the mask of ring_attention_varlen's `causal` and `window_size`; a batch without documents
        needs nothing."""
        if cu_seqlens is None:
            return
        documents, band = check_cu_seqlens(cu_seqlens), band_interval(BandMask.from_flags(causal, window_size))
        self._wait()
        if self._planner is None:
            self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fa4_cp-plan")
        self._ahead = (documents, seq_len, self._planner.submit(self._place, documents, seq_len, band))

    def _place(self, documents: tuple[int, ...], seq_len: int, band: tuple[float, float]) -> tuple[int, int]:
        ulysses, chunks = next(iter(self.groups)), 1
        if len(self.groups) > 1:  # plan_mesh places them over the ring ranks of every split that can win
            plan = plan_mesh(self.cp_size, self.heads, self.kv_heads, seq_len, head_dim=self.head_dim, documents=list(documents))
            ulysses, chunks = plan.ulysses, plan.head_chunks
        span_streams(balanced_sharding(documents, self.cp_size // ulysses, placement_heads(ulysses)), band)
        return ulysses, chunks

    def _wait(self) -> tuple[tuple[int, ...], int, tuple[int, int]] | None:
        """Until the batch planned ahead is placed: (its documents, seq_len, the split chosen for
        it), or None. A failure is not raised here: `choose` and the sharding place that batch
        again on the caller's thread, and raise there."""
        if self._ahead is None:
            return None
        (documents, seq_len, ahead), self._ahead = self._ahead, None
        return None if ahead.exception() is not None else (documents, seq_len, ahead.result())

    def choose(self, cu_seqlens: torch.Tensor | None, seq_len: int) -> SplitChoice:
        """The split for a batch of `seq_len` tokens, packed `cu_seqlens` if any."""
        planned = self._wait()
        if len(self.groups) == 1:
            return SplitChoice(*next(iter(self.groups.items())), 1)
        documents = None if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if planned is not None and documents is not None and planned[:2] == (tuple(documents), seq_len):
            ulysses, chunks = planned[2]  # the split the worker chose for this batch
            return SplitChoice(ulysses, self.groups[ulysses], chunks)
        plan = plan_mesh(self.cp_size, self.heads, self.kv_heads, seq_len, head_dim=self.head_dim, documents=documents)
        return SplitChoice(plan.ulysses, self.groups[plan.ulysses], plan.head_chunks)
