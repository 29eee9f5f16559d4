"""The parent's bounded queue of jobs, with retries that wait their turn.

It holds names, not files: a job is a few strings. A job's key (date,
session, name) is in at most one place at a time (queued, waiting to retry,
or in flight), which is what keeps one file out of two uploaders of the same
instance. The key, not the bare name: two files of one name claimed under
two sessions (or dates) are two files, and both must be uploaded.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from dataclasses import dataclass

from ingestd.messages import Job


class WorkQueue:
    """FIFO of new jobs, a priority lane for recovered ones, and a retry heap."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._recovered: deque[Job] = deque()
        self._new: deque[Job] = deque()
        self._retries: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._keys: set[tuple[str, str, str]] = set()
        # Jobs waiting per (date, session), kept as they come and go: /v1/status
        # asks for it on every request, and counting a full queue each time
        # cost the parent more than the request's own work.
        self._waiting: Counter[tuple[str, str]] = Counter()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._recovered) + len(self._new) + len(self._retries)

    def holds(self, key: tuple[str, str, str]) -> bool:
        """Is the job with ``key`` queued, waiting to retry, or in flight?"""
        return key in self._keys

    def add_new(self, job: Job) -> bool:
        """Queue a freshly stable file; False if known or the queue is full.

        A full queue drops the job: the file stays in incoming and the next
        poll offers it again, which is all the back-pressure needed.
        """
        if job.key in self._keys:
            return False
        if len(self) >= self.max_size:
            self.dropped += 1
            return False
        self._keys.add(job.key)
        self._new.append(job)
        self._count(job, 1)
        return True

    def add_recovered(self, job: Job) -> bool:
        """Queue a file found in ``.processing``; these go first and are never dropped.

        Recovery runs once per start, so a dropped one would wait for the
        next restart; they are few and small, so the bound does not apply.
        """
        if job.key in self._keys:
            return False
        self._keys.add(job.key)
        self._recovered.append(job)
        self._count(job, 1)
        return True

    def retry(self, job: Job, not_before: float) -> None:
        """Put a failed or interrupted job back, due at ``not_before`` (monotonic)."""
        self._keys.add(job.key)
        heapq.heappush(self._retries, (not_before, next(self._order), job))
        self._count(job, 1)

    def take(self, now: float) -> Job | None:
        """The next job to run: a due retry, a recovered file, then a new one.

        The key stays reserved until :meth:`finish` is called for it.
        """
        if self._retries and self._retries[0][0] <= now:
            job = heapq.heappop(self._retries)[2]
        elif self._recovered:
            job = self._recovered.popleft()
        elif self._new:
            job = self._new.popleft()
        else:
            return None
        self._count(job, -1)
        return job

    def _count(self, job: Job, delta: int) -> None:
        session = job.key[:2]
        left = self._waiting[session] + delta
        if left:
            self._waiting[session] = left
        else:
            del self._waiting[session]

    def finish(self, job: Job) -> None:
        """The job left the instance: done, gone, or quarantined."""
        self._keys.discard(job.key)

    def jobs(self) -> list[Job]:
        """Every job waiting (not those in flight), for per-session counts."""
        return [*self._recovered, *self._new, *(entry[2] for entry in self._retries)]

    def waiting_by_session(self) -> Counter[tuple[str, str]]:
        """Jobs waiting (not in flight) per (date, session): ``Counter(j.key[:2] for j
        in jobs())``, without walking the queue."""
        return Counter(self._waiting)

    def depth(self) -> dict[str, int]:
        return {
            "recovered": len(self._recovered),
            "new": len(self._new),
            "retrying": len(self._retries),
        }

    def next_retry_in(self, now: float) -> float | None:
        return max(0.0, self._retries[0][0] - now) if self._retries else None


@dataclass
class OutageBackoff:
    """When to retry after an outage (endpoint unreachable, 5xx, throttled, auth).

    One backoff for everyone: an outage fails every file in flight, not one
    file. Raising the level for each of those failures would reach the cap
    within a round (four uploaders: 2, 32, 60 s) and leave the service idle
    up to a minute after the endpoint is back. The level rises once per
    round instead: a failure that arrives while a backoff runs came from an
    attempt started before it and retries with the rest when it ends.
    """

    cap_s: float
    level: int = 0
    until: float = 0.0

    def retry_at(self, now: float) -> float:
        """A file failed for an outage at ``now``: when may it be tried again?"""
        if now >= self.until:
            self.level += 1
            self.until = now + min(self.cap_s, 2.0 ** min(self.level, 16))
        return self.until

    def reset(self) -> None:
        """An upload succeeded: the endpoint is back."""
        self.level, self.until = 0, 0.0
