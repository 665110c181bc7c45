"""Cross-rank consistency check: a mismatched ring call raises on every rank instead of hanging.

Before the ring starts, the ranks all-gather a 63-bit hash of everything that must agree (local
shapes, dtype, mask, layout, documents, scale, backend). It is on by default: a mismatch otherwise
deadlocks or silently corrupts the result. It costs one tiny all-gather per forward call (see
the README for measured figures); turn it off with `set_consistency_check(False)` or
FA4_CP_CHECK_CONSISTENCY=0 once a training setup is known to be good.
"""

from __future__ import annotations

import hashlib
import os

import torch

from .parallel.transport import Transport

_enabled = os.environ.get("FA4_CP_CHECK_CONSISTENCY", "1") != "0"


def set_consistency_check(enabled: bool) -> None:
    """Turn the cross-rank check of ring_attention calls on or off (every rank alike)."""
    global _enabled
    _enabled = bool(enabled)


def consistency_check_enabled() -> bool:
    return _enabled


def signature_hash(signature: tuple) -> int:
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_consistency(transport: Transport, signature: tuple, device: torch.device) -> None:
    if not _enabled or transport.world_size == 1:
        return
    mine = torch.tensor([signature_hash(signature)], dtype=torch.int64, device=device)
    gathered = torch.cat(transport.all_gather(mine))
    if transport.watchdog is not None:  # a GIL-free wait with the ring's timeout, not a blind sync
        done = torch.cuda.Event()
        done.record()
        transport.watchdog.wait(done, "the cross-rank check of the call's arguments")
    hashes = gathered.tolist()
    differing = [rank for rank, h in enumerate(hashes) if h != hashes[0]]
    if differing:
        raise ValueError(
            f"ring attention call differs across the ranks of the group: ranks {differing} disagree with rank 0 on "
            f"shapes, dtype, mask, layout, documents, scale or backend. This rank ({transport.rank}) called with {signature}"
        )
