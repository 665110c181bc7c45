"""Cross-rank consistency check: a mismatched ring call raises on every rank instead of hanging.

Before the ring starts, the ranks all-gather their RingCall's 63-bit digest (call.py: shapes,
dtype, mask, layout, documents, scale, backend, transport), the call's number on the group
(every call counts, a refused one too, so a rank that caught its own error and carried on does
not pair its next call with its peers' previous one) and a fingerprint of the sinks' values
(every rank must pass the same; reading them from a GPU when the check runs on the CPU waits for
the GPU's queued work, one more reason to turn the check off once a setup is known good). If any
differs, they all-gather the
calls' fields (every rank sees the same digests, so every rank takes part) and each raises a
ValueError naming the fields that differ and every rank's value. A rank whose peer never joins
fails within FA4_CP_RING_TIMEOUT. The all-gather runs on the CPU where the group can (a gloo
backend beside NCCL, `init_process_group("cpu:gloo,cuda:nccl")`): the host then waits for its
peers only, never for the GPU's queued work. On by default: a mismatch otherwise deadlocks or silently
corrupts the result. It costs one tiny all-gather per forward call (see docs/design.md for measured
figures); turn it off with `set_consistency_check(False)` or FA4_CP_CHECK_CONSISTENCY=0 once a
training setup is known to be good.
"""

from __future__ import annotations

import os
import weakref

import torch

from .call import RingCall
from .comm.group import RingGroup
from .comm.watchdog import timeout_message, wait_for

_override: bool | None = None
_calls: weakref.WeakKeyDictionary[RingGroup, int] = weakref.WeakKeyDictionary()


def count_call(group: RingGroup) -> int:
    """This call's number on `group` (1, 2, ...): counted when the call starts, before anything
    is checked, so that the ranks' numbers agree exactly when they made the same calls."""
    _calls[group] = number = _calls.get(group, 0) + 1
    return number


def set_consistency_check(enabled: bool | None) -> None:
    """Turn the cross-rank check of ring attention calls on or off (every rank alike); None goes
    back to FA4_CP_CHECK_CONSISTENCY (on unless it is "0")."""
    global _override
    _override = None if enabled is None else bool(enabled)


def consistency_check_enabled() -> bool:
    if _override is not None:
        return _override
    return os.environ.get("FA4_CP_CHECK_CONSISTENCY", "1") != "0"


def _sinks_fingerprint(sinks: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Two int64 words (the fp64 bits of two weighted sums) that differ when the values do."""
    if sinks is None:
        return torch.zeros(2, dtype=torch.int64, device=device)
    values = sinks.detach().to(device=device, dtype=torch.float64).flatten()
    weights = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=device)
    return torch.stack([(values * weights).sum(), (values * values).sum()]).view(torch.int64)


def check_consistency(group: RingGroup, call: RingCall, device: torch.device, number: int, sinks: torch.Tensor | None = None) -> None:
    """`number`: the call's `count_call` on `group`; `sinks`: the call's sinks, if any."""
    if group.world_size == 1 or not consistency_check_enabled():
        return
    what = "the cross-rank check of the call"
    device = group.check_device(device)
    signature = torch.cat([torch.tensor([call.digest, number], dtype=torch.int64, device=device), _sinks_fingerprint(sinks, device)])
    gathered = torch.stack(group.all_gather(signature, what))
    if device.type == "cuda":  # a GIL-free wait with the ring's timeout, not a blind sync
        done = torch.cuda.Event()
        done.record()
        seconds = group.timeout()
        wait_for(done, seconds, lambda: timeout_message(group.rank, group.world_size, what, seconds))
    signatures = gathered.tolist()
    if any(signature != signatures[0] for signature in signatures):
        values = "None"
        if sinks is not None:
            listed = sinks.detach().flatten().tolist()
            values = f"{listed[:4]}{' ...' if len(listed) > 4 else ''} (fingerprint {signature[2:].tolist()})"
        described = {**call.describe(), "call number on this group": str(number), "sinks values": values}
        raise ValueError(mismatch_message(group.all_gather_object(described), group.rank))


def mismatch_message(calls: list[dict[str, str]], rank: int) -> str:
    """Which fields differ, with each rank's value (ranks that agree are grouped)."""
    differing = []
    for field in calls[0]:
        values: dict[str, list[int]] = {}
        for other, described in enumerate(calls):
            values.setdefault(described[field], []).append(other)
        if len(values) > 1:
            per_value = "; ".join(f"ranks {_ranges(ranks)}: {value}" for value, ranks in values.items())
            differing.append(f"{field} ({per_value})")
    return (
        f"ring attention call differs across the ranks of the group (seen on rank {rank}): "
        + ", ".join(differing) + ". Every rank must make the same calls, with the same shapes, mask, layout, documents, scale "
        "and backend."
    )


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and runs[-1][1] == rank - 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
