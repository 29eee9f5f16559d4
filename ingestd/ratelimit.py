"""The upload rate limit inside one uploader: a token bucket its block threads share.

The pod's cap (``APP_AZURE_MAX_MBPS``, or ``POST /v1/limits``) is divided by
the parent among the uploaders that have a job; each uploader learns its
share over its own pipe and applies it here, in
:meth:`~ingestd.blobupload.FileRange.read`, per 128 KiB read, and before a
one-request file's Put Blob, for its whole size. Nothing is shared
between processes, so a killed uploader cannot leave a lock held or a budget
spent.

Scheduling is GCRA (virtual time): each read reserves its slot on a timeline
that advances by ``bytes / rate`` and sleeps until its slot, so a waiting
thread wakes once, not in a polling loop. The timeline may lag the clock by
at most ``BURST_S`` (the bucket's depth): an uploader idle for a moment
between files catches up that much, and no more.

A wait is sliced (``WAIT_SLICE_S``) and ``on_wait`` is called between slices:
that is the heartbeat of a thread waiting for budget, so waiting is never
mistaken for a stall, while a thread stuck in a syscall still stops beating.
A rate change abandons every reservation made at the old rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BURST_S = 0.25
"""Seconds of budget an idle uploader may bank: enough to bridge the claim and
commit between two files, small against the 5 s over which the cap is held."""
WAIT_SLICE_S = 0.2
"""Longest sleep between two heartbeats of a waiting thread (the channel sends
at most one beat per 0.25 s anyway)."""


class TokenBucket:
    """Bytes per second for every thread of one process; 0 means no limit."""

    def __init__(
        self,
        rate: float = 0.0,
        burst_s: float = BURST_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._burst_s = burst_s
        self._rate = max(0.0, float(rate))
        self._next_free = clock()
        self._generation = 0

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Apply a new rate now: reservations made at the old rate are dropped."""
        with self._lock:
            self._rate = max(0.0, float(rate))
            self._next_free = self._clock()
            self._generation += 1

    def take(self, size: int, on_wait: Callable[[], None] | None = None) -> None:
        """Return once ``size`` bytes may be sent; at once when there is no limit."""
        if self._rate <= 0:  # unlocked read: the uncapped path costs one comparison
            return
        while True:
            with self._lock:
                if self._rate <= 0:
                    return
                now = self._clock()
                start = max(self._next_free, now - self._burst_s)
                self._next_free = start + size / self._rate
                generation = self._generation
            if self._sleep_until(start, generation, on_wait):
                return

    def _sleep_until(
        self, start: float, generation: int, on_wait: Callable[[], None] | None
    ) -> bool:
        """Sleep until ``start``; False if the rate changed meanwhile (reserve again)."""
        while True:
            left = start - self._clock()
            if left <= 0:
                return True
            self._sleep(min(left, WAIT_SLICE_S))
            if on_wait is not None:
                on_wait()
            if self._generation != generation:
                return False
