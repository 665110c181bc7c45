"""Hop watchdog: a ring hop that does not complete within the timeout ends the process with a
clear error instead of hanging it.

Two guards. A thread watches the hops in posting order: the hop at the head of the queue gets
`timeout` seconds from the later of its posting and the completion of the hop before it, so a
host that runs far ahead of its GPU does not trip it. And every ring call paces the host: it may
be at most CALLS_AHEAD calls ahead of its GPU, waiting in a GIL-free poll, so a stuck hop never
leaves the main thread blocked inside CUDA with the GIL held (which would starve the thread).
Like NCCL's own watchdog, neither can cancel a transfer the GPU is stuck in, so they log the
error and exit the process (exit code `EXIT_CODE`); torchrun then stops the job.

Host-side waits (gloo, the CPU cross-rank check) go through `wait_within`, which raises instead.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

EXIT_CODE = 124
CALLS_AHEAD = 2
POLL_SECONDS = 0.05
logger = logging.getLogger("fa4_cp")


class RingTimeoutError(RuntimeError):
    """A peer did not answer within the ring timeout (raised where the wait can be abandoned)."""


class RingPeerLostError(RuntimeError):
    """A wait failed before the ring timeout: the connection to a peer broke (it exited or crashed)."""


def peer_lost_message(rank: int, world_size: int, what: object, elapsed: float, seconds: float, error: BaseException) -> str:
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"fa4_cp ring: rank {rank} of {world_size}: {what} failed after {elapsed:.1f} s, before the {seconds:g} s timeout: "
        f"a peer rank exited or closed its connection ({cause})"
    )


class Hop(NamedTuple):
    """A hop as the watchdog names it; formatted only if it times out."""

    what: str
    step: int
    offset: int
    rank: int
    world_size: int

    def __str__(self) -> str:
        source, target = (self.rank - self.offset) % self.world_size, (self.rank + self.offset) % self.world_size
        return (
            f"the {self.what} hop after ring step {self.step}, {self.offset:+d} rank(s) "
            f"(rank {source} -> rank {self.rank} -> rank {target})"
        )


def timeout_message(rank: int, world_size: int, what: object, seconds: float, exits: bool = True) -> str:
    ending = f" Exiting with code {EXIT_CODE}." if exits else ""
    return (
        f"fa4_cp ring timeout: rank {rank} of {world_size}: {what} did not complete within {seconds:g} s. "
        "A peer rank died, raised, or stopped calling ring attention with the same arguments. "
        f"Set FA4_CP_RING_TIMEOUT (seconds) to change the limit.{ending}"
    )


class HopWatchdog:
    def __init__(self, rank: int, world_size: int, timeout: float, on_timeout=None):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._on_timeout = on_timeout or _exit_process
        self._hops: collections.deque[tuple[torch.cuda.Event, float, object]] = collections.deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._calls: collections.deque[tuple[torch.cuda.Event, object]] = collections.deque()
        self._last: tuple[torch.cuda.Event, object] | None = None

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

    def wait(self, done: torch.cuda.Event, what: object) -> None:
        """Block the host until `done`; past the timeout, fail naming `what` (str() of it)."""
        wait_for(done, self.timeout, lambda: timeout_message(self.rank, self.world_size, what, self.timeout), self._on_timeout)

    def track(self, done: torch.cuda.Event, hop: object) -> None:
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


def wait_for(event: torch.cuda.Event, timeout: float, message: Callable[[], str], on_timeout=None) -> None:
    """Block the host until `event` completes, polling with the GIL released between polls (a
    thread blocked inside CUDA with the GIL held would also stall the watchdog thread).
    `message` is called only if the wait times out."""
    deadline = time.monotonic() + timeout
    pause = 1e-5
    while not event.query():
        if time.monotonic() > deadline:
            (on_timeout or _exit_process)(message())
            return
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def _exit_process(message: str) -> None:
    logger.critical(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def wait_within(work, seconds: float, rank: int, world_size: int, what: str) -> None:
    """Wait for a torch.distributed request on the host; past `seconds`, raise naming `what`. A
    wait that fails sooner is a broken connection, reported as such."""
    started = time.monotonic()
    try:
        work.wait(timeout=datetime.timedelta(seconds=seconds))
    except RuntimeError as error:
        elapsed = time.monotonic() - started
        if elapsed < 0.9 * seconds:
            raise RingPeerLostError(peer_lost_message(rank, world_size, what, elapsed, seconds, error)) from error
        raise RingTimeoutError(timeout_message(rank, world_size, what, seconds, exits=False)) from error
