"""Where compiled kernels live: in memory, and on disk so that later processes skip the JIT.

Kernels compile just in time, seconds per configuration; without a disk cache every rank of
every run pays that at its first call (flash-attention#2635). Entries are keyed by the kernel's
configuration under a fingerprint of the FA4 sources, CUTLASS DSL version and fa4_cp's kernel
sources, so any code change starts a fresh cache. FA4_CP_KERNEL_CACHE_DIR moves it;
FA4_CP_KERNEL_CACHE=0 keeps it in memory only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from getpass import getuser
from pathlib import Path

from flash_attn.cute.cache_utils import JITCache, JITPersistentCache, _compute_source_fingerprint


@functools.lru_cache(maxsize=1)
def _fingerprint() -> str:
    digest = hashlib.sha256(_compute_source_fingerprint().encode())
    here = Path(__file__).parent
    for source in sorted(here.rglob("*.py")):  # every kernel source, sub-folders included
        digest.update(str(source.relative_to(here)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def kernel_cache(name: str) -> JITCache:
    if os.environ.get("FA4_CP_KERNEL_CACHE", "1") == "0":
        return JITCache()
    root = Path(os.environ.get("FA4_CP_KERNEL_CACHE_DIR", Path(tempfile.gettempdir()) / getuser() / "fa4_cp_kernels"))
    return JITPersistentCache(root / _fingerprint() / name)
