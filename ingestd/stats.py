"""Counters the supervisor keeps and the API reports.

Plain numbers in the parent, fed only by the children's messages: no shared
memory, no multiprocess metrics mode, nothing a killed child can corrupt.

Per-session counters are bounded: the active session and the ``history``
sessions most recently started or reporting a result are kept; older ones
are folded into one aggregate. Every start without a name is a new session,
so without the bound a client starting sessions in a loop would grow the
parent's memory and ``/v1/status`` without end.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from ingestd.messages import Stage

SessionKey = tuple[str, str]
"""``(date, encoded session)``"""


@dataclass
class SessionCounters:
    """Per ``<date>/<session>`` prefix."""

    date: str
    session: str
    files_done: int = 0
    bytes_done: int = 0
    failed: int = 0
    quarantined: int = 0


@dataclass
class OlderSessions:
    """Sessions folded out of the per-session list, summed."""

    count: int = 0  # entries folded (a session revived by a late result can count twice)
    files_done: int = 0
    bytes_done: int = 0
    failed: int = 0
    quarantined: int = 0

    def fold(self, counters: SessionCounters) -> None:
        self.count += 1
        self.files_done += counters.files_done
        self.bytes_done += counters.bytes_done
        self.failed += counters.failed
        self.quarantined += counters.quarantined


@dataclass
class Stats:
    processed_ok: int = 0
    processed_err: int = 0
    bytes_ok: int = 0
    last_error: str | None = None
    last_success_at: float | None = None
    skipped: int = 0
    quarantined: int = 0
    gave_up: Counter[Stage] = field(default_factory=Counter)
    interrupted: int = 0
    recovered_total: int = 0
    windowed_total: int = 0  # files uploaded through a staging window
    scan_errors: int = 0
    scans: int = 0
    last_scan_seen: int = 0
    last_scan_stable: int = 0
    last_scan_seconds: float = 0.0
    backlog_files: int = 0  # stable files waiting in incoming at the last poll
    backlog_bytes: int = 0
    restarts: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    history: int = 100
    sessions: OrderedDict[SessionKey, SessionCounters] = field(default_factory=OrderedDict)
    older: OlderSessions = field(default_factory=OlderSessions)
    active: SessionKey | None = None  # never folded

    def session(self, date: str, session: str) -> SessionCounters:
        """The counters of one session, created if needed; it becomes the most recent."""
        key = (date, session)
        counters = self.sessions.get(key)
        if counters is None:
            counters = self.sessions[key] = SessionCounters(date, session)
        self.sessions.move_to_end(key)
        return counters

    def start(self, date: str, session: str) -> None:
        """Register the session now active; it is kept whatever the history."""
        self.active = (date, session)
        self.session(date, session)
        self._fold()

    def _fold(self) -> None:
        """Fold the least recent sessions until at most ``history`` besides the active remain.

        Called after each update, never between a lookup and its update, so a
        count is never added to a session already folded away.
        """
        kept = len(self.sessions) - (self.active in self.sessions)
        while kept > self.history:
            key = next(iter(self.sessions))
            if key == self.active:
                self.sessions.move_to_end(key)
                continue
            self.older.fold(self.sessions.pop(key))
            kept -= 1

    def on_done(self, counters: SessionCounters, size: int) -> None:
        self.processed_ok += 1
        self.bytes_ok += size
        self.last_success_at = time.time()
        counters.files_done += 1
        counters.bytes_done += size
        self._fold()

    def on_failed(self, counters: SessionCounters, error: str) -> None:
        self.processed_err += 1
        self.last_error = error
        counters.failed += 1
        self._fold()

    def on_quarantined(self, counters: SessionCounters, error: str) -> None:
        self.processed_err += 1
        self.quarantined += 1
        self.last_error = error
        counters.failed += 1
        counters.quarantined += 1
        self._fold()

    def on_gave_up(self, counters: SessionCounters, stage: Stage, error: str) -> None:
        """No more tries this run (the file stays on NFS); counted by the step that failed."""
        self.processed_err += 1
        self.gave_up[stage] += 1
        self.last_error = error
        counters.failed += 1
        self._fold()

    def on_scan(self, seen: int, stable: int, seconds: float) -> None:
        self.scans += 1
        self.last_scan_seen, self.last_scan_stable = seen, stable
        self.last_scan_seconds = seconds

    def on_backlog(self, files: int, size: int) -> None:
        """What waits in incoming: the scaling signal (every replica sees the same folder)."""
        self.backlog_files, self.backlog_bytes = files, size
