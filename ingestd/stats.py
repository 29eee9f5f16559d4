"""Counters the supervisor keeps and the API reports.

Plain numbers in the parent, fed only by the children's messages: no shared
memory, no multiprocess metrics mode, nothing a killed child can corrupt.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field


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
class Stats:
    processed_ok: int = 0
    processed_err: int = 0
    bytes_ok: int = 0
    last_error: str | None = None
    last_success_at: float | None = None
    skipped: int = 0
    quarantined: int = 0
    gave_up: Counter = field(default_factory=Counter)
    interrupted: int = 0
    recovered_total: int = 0
    scan_errors: int = 0
    scans: int = 0
    last_scan_seen: int = 0
    last_scan_stable: int = 0
    last_scan_seconds: float = 0.0
    restarts: Counter = field(default_factory=Counter)
    kills: Counter = field(default_factory=Counter)
    sessions: dict[tuple[str, str], SessionCounters] = field(default_factory=dict)

    def session(self, date: str, session: str) -> SessionCounters:
        key = (date, session)
        if key not in self.sessions:
            self.sessions[key] = SessionCounters(date, session)
        return self.sessions[key]

    def on_done(self, counters: SessionCounters, size: int) -> None:
        self.processed_ok += 1
        self.bytes_ok += size
        self.last_success_at = time.time()
        counters.files_done += 1
        counters.bytes_done += size

    def on_failed(self, counters: SessionCounters, error: str) -> None:
        self.processed_err += 1
        self.last_error = error
        counters.failed += 1

    def on_quarantined(self, counters: SessionCounters, error: str) -> None:
        self.processed_err += 1
        self.quarantined += 1
        self.last_error = error
        counters.failed += 1
        counters.quarantined += 1

    def on_gave_up(self, counters: SessionCounters, stage: str, error: str) -> None:
        """No more tries this run (the file stays on NFS); counted by the step that failed."""
        self.processed_err += 1
        self.gave_up[stage] += 1
        self.last_error = error
        counters.failed += 1

    def on_scan(self, seen: int, stable: int, seconds: float) -> None:
        self.scans += 1
        self.last_scan_seen, self.last_scan_stable = seen, stable
        self.last_scan_seconds = seconds

    def totals(self) -> dict:
        return {
            "processed_ok": self.processed_ok,
            "processed_err": self.processed_err,
            "last_error": self.last_error,
            "bytes_ok": self.bytes_ok,
            "last_success_at": self.last_success_at,
            "skipped_gone": self.skipped,
            "quarantined": self.quarantined,
            "gave_up_by_stage": dict(self.gave_up),
            "interrupted": self.interrupted,
            "recovered": self.recovered_total,
            "scan": {
                "polls": self.scans,
                "errors": self.scan_errors,
                "last_seen": self.last_scan_seen,
                "last_stable": self.last_scan_stable,
                "last_seconds": round(self.last_scan_seconds, 4),
            },
            "restarts": dict(self.restarts),
            "kills": dict(self.kills),
        }

    def sessions_view(self) -> list[tuple[tuple[str, str], dict]]:
        return [(key, asdict(c)) for key, c in self.sessions.items()]
