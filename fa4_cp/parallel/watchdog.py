"""Hop watchdog: a ring hop that does not complete within the timeout ends the process with a
clear error instead of hanging it.

Two guards. A thread watches the hops in posting order: the hop at the head of the queue gets
`timeout` seconds from the later of its posting and the completion of the hop before it, so a
host that runs far ahead of its GPU does not trip it. And every ring call paces the host: it may
be at most CALLS_AHEAD calls ahead of its GPU, waiting in a GIL-free poll, so a stuck hop never
leaves the main thread blocked inside CUDA with the GIL held (which would starve the thread).
Like NCCL's own watchdog, neither can cancel a transfer the GPU is stuck in, so they log the
error and exit the process (exit code `EXIT_CODE`); torchrun then stops the job.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

import torch

EXIT_CODE = 124
CALLS_AHEAD = 2
POLL_SECONDS = 0.05
logger = logging.getLogger("fa4_cp")


def timeout_message(rank: int, world_size: int, hop: str, seconds: float) -> str:
    return (
        f"fa4_cp ring timeout: rank {rank} of {world_size}: {hop} did not complete within {seconds:g} s. "
        "A peer rank died, raised, or stopped calling ring attention with the same arguments. "
        f"Set FA4_CP_RING_TIMEOUT (seconds) to change the limit. Exiting with code {EXIT_CODE}."
    )


class HopWatchdog:
    def __init__(self, rank: int, world_size: int, timeout: float, on_timeout=None):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._on_timeout = on_timeout or _exit_process
        self._hops: collections.deque[tuple[torch.cuda.Event, float, str]] = collections.deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._calls: collections.deque[tuple[torch.cuda.Event, str]] = collections.deque()
        self._last: tuple[torch.cuda.Event, str] | None = None

    def end_of_call(self) -> None:
        """The host may run at most CALLS_AHEAD ring calls ahead of the GPU, so a stuck hop stops
        it here, in a GIL-free wait, rather than deep inside a kernel launch once the launch
        queue is full."""
        if self._last is None:
            return
        self._calls.append(self._last)
        self._last = None
        if len(self._calls) > CALLS_AHEAD:
            self.wait(*self._calls.popleft())

    def wait(self, done: torch.cuda.Event, what: str) -> None:
        """Block the host until `done`; past the timeout, fail naming `what`."""
        wait_for(done, self.timeout, timeout_message(self.rank, self.world_size, what, self.timeout), self._on_timeout)

    def track(self, done: torch.cuda.Event, hop: str) -> None:
        self._last = (done, hop)
        with self._lock:
            self._hops.append((done, time.monotonic(), hop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="fa4_cp-hop-watchdog", daemon=True)
                self._thread.start()

    def _watch(self) -> None:
        head_since = time.monotonic()
        while True:
            time.sleep(POLL_SECONDS)
            with self._lock:
                while self._hops and self._hops[0][0].query():
                    self._hops.popleft()
                    head_since = time.monotonic()
                if not self._hops:
                    continue
                _, posted, hop = self._hops[0]
            waited = time.monotonic() - max(posted, head_since)
            if waited > self.timeout:
                self._on_timeout(timeout_message(self.rank, self.world_size, hop, self.timeout))
                return


def wait_for(event: torch.cuda.Event, timeout: float, message: str, on_timeout=None) -> None:
    """Block the host until `event` completes, polling with the GIL released between polls (a
    thread blocked inside CUDA with the GIL held would also stall the watchdog thread)."""
    deadline = time.monotonic() + timeout
    pause = 1e-5
    while not event.query():
        if time.monotonic() > deadline:
            (on_timeout or _exit_process)(message)
            return
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def _exit_process(message: str) -> None:
    logger.critical(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def ring_timeout(group: object) -> float:
    """FA4_CP_RING_TIMEOUT if set, else the process group's own timeout, else NCCL's default (600 s)."""
    if "FA4_CP_RING_TIMEOUT" in os.environ:
        return float(os.environ["FA4_CP_RING_TIMEOUT"])
    try:
        return group._get_backend(torch.device("cuda")).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return 600.0
