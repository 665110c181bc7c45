"""The hop watchdog ends a stuck ring with a clear error, and does not fire on slow but moving hops."""

import threading
import time

from fa4_cp.comm.watchdog import HopWatchdog, timeout_message


class FakeEvent:
    def __init__(self, done_after: float | None):
        self.created = time.monotonic()
        self.done_after = done_after

    def query(self) -> bool:
        return self.done_after is not None and time.monotonic() - self.created >= self.done_after


def watch(events, timeout):
    fired = []
    signalled = threading.Event()

    def on_timeout(message):
        fired.append(message)
        signalled.set()

    watchdog = HopWatchdog(rank=1, world_size=4, timeout=timeout, on_timeout=on_timeout)
    for number, event in enumerate(events):
        watchdog.track(event, f"hop {number}")
    signalled.wait(timeout * len(events) + 1.0)
    return fired


def test_a_stuck_hop_fires_with_rank_and_hop_named():
    fired = watch([FakeEvent(0.0), FakeEvent(None)], timeout=0.3)
    assert fired == [timeout_message(1, 4, "hop 1", 0.3)]
    assert "rank 1 of 4: hop 1 did not complete within 0.3 s" in fired[0]


def test_hops_that_each_finish_within_the_timeout_do_not_fire():
    """Queued behind each other they take longer than one timeout in total; each gets its own."""
    fired = watch([FakeEvent(0.2), FakeEvent(0.4), FakeEvent(0.6)], timeout=0.35)
    assert fired == []
