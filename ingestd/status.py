"""What the service shows about itself: a typed snapshot of the supervisor's state, and its views.

The supervisor copies what ``/v1/status``, ``/healthz``, ``/v1/limits`` and
``/metrics`` need into a :class:`Snapshot` in one go under its lock
(:meth:`ingestd.supervisor.Supervisor.snapshot`): plain values, frozen
records and a copy of the storage health, no I/O, so the lock is held for a
moment. The JSON answers are built here from the snapshot, outside the lock;
:mod:`ingestd.metrics` builds its Prometheus families from it the same way.

Histograms go the other way: the supervisor reports each poll and each
upload to the :class:`Observer` it is given (:class:`ingestd.metrics.Metrics`
in the service), so it never imports the metrics itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ingestd.messages import ChildState, Job, Stage
from ingestd.sessions import Session
from ingestd.stats import SessionCounters, SessionKey, Stats
from ingestd.storagehealth import StorageHealth

LOOP_STALE_S = 10.0
"""The loop ticks every 0.2 s; ten seconds without a tick means it is wedged."""


class Observer(Protocol):
    """What the supervisor reports as results arrive: the histograms' observations."""

    def scanned(self, seconds: float) -> None:
        """One poll of the incoming folder took ``seconds``."""

    def uploaded(self, seconds: float, size: int) -> None:
        """A file of ``size`` bytes was uploaded and cleaned up in ``seconds``."""


class Unobserved:
    """An :class:`Observer` that records nothing (a supervisor without metrics)."""

    def scanned(self, seconds: float) -> None:
        pass

    def uploaded(self, seconds: float, size: int) -> None:
        pass


# The snapshot


@dataclass(frozen=True)
class StatsSnapshot:
    """The counters of :class:`ingestd.stats.Stats`, copied (no per-session ones)."""

    processed_ok: int
    processed_err: int
    bytes_ok: int
    last_error: str | None
    last_success_at: float | None
    skipped: int
    quarantined: int
    gave_up: Mapping[Stage, int]
    interrupted: int
    recovered_total: int
    windowed_total: int
    scan_errors: int
    scans: int
    last_scan_seen: int
    last_scan_stable: int
    last_scan_seconds: float
    backlog_files: int
    backlog_bytes: int
    restarts: Mapping[str, int]
    kills: Mapping[str, int]

    @classmethod
    def of(cls, stats: Stats) -> StatsSnapshot:
        return cls(
            processed_ok=stats.processed_ok,
            processed_err=stats.processed_err,
            bytes_ok=stats.bytes_ok,
            last_error=stats.last_error,
            last_success_at=stats.last_success_at,
            skipped=stats.skipped,
            quarantined=stats.quarantined,
            gave_up=dict(stats.gave_up),
            interrupted=stats.interrupted,
            recovered_total=stats.recovered_total,
            windowed_total=stats.windowed_total,
            scan_errors=stats.scan_errors,
            scans=stats.scans,
            last_scan_seen=stats.last_scan_seen,
            last_scan_stable=stats.last_scan_stable,
            last_scan_seconds=stats.last_scan_seconds,
            backlog_files=stats.backlog_files,
            backlog_bytes=stats.backlog_bytes,
            restarts=dict(stats.restarts),
            kills=dict(stats.kills),
        )


@dataclass(frozen=True)
class SessionRow:
    """One session's counters, with its files queued and in flight."""

    date: str
    session: str
    files_done: int
    bytes_done: int
    failed: int
    quarantined: int
    queued: int
    in_flight: int


@dataclass(frozen=True)
class OlderRow:
    """The sessions folded out of the per-session list, summed (``older_sessions``)."""

    count: int
    files_done: int
    bytes_done: int
    failed: int
    quarantined: int
    queued: int


@dataclass(frozen=True)
class GivenUp:
    """A file with no more tries in this run, and where it stays (``gave_up``)."""

    file: str
    date: str
    session: str
    stage: Stage
    error: str
    stays_at: str
    at: float  # wall clock


@dataclass(frozen=True)
class SlotSnapshot:
    """One child slot (the scanner, or an uploader) and its job; ages as of the snapshot."""

    role: str
    kind: str  # "scanner" or "uploader"
    pid: int | None
    state: ChildState
    file: str | None
    beat_age: float
    live_age: float  # heartbeat age for liveness (see Slot.live_age)
    stalled: bool  # its children stall and are replaced (Slot.stalled_since)
    syscall_age: float | None  # a side thread's file syscall in progress for this long
    waiting: str
    restarts: int
    held_back: str | None
    job: Job | None
    job_seconds: float  # since the job was handed out
    bytes_done: int
    bytes_total: int
    reserved: int  # staging bytes the job holds (its window, or its size)


@dataclass(frozen=True)
class StagingSnapshot:
    """The staging budget and what files in flight hold of it (``staging``)."""

    budget_bytes: int
    filesystem_bytes: int
    reserved_bytes: int
    window_bytes: int
    windowed_in_flight: tuple[str, ...]
    windowed_total: int
    waiting_for_space: str | None


@dataclass(frozen=True)
class QueueSnapshot:
    """The work queue's lengths; ``parked``: a job taken out to wait for staging room."""

    recovered: int
    new: int
    retrying: int
    parked: bool
    max_size: int
    dropped: int

    @property
    def depth(self) -> int:
        return self.recovered + self.new + self.retrying + self.parked


@dataclass(frozen=True)
class RateSnapshot:
    """The pod's upload rate cap (bytes/s, 0: none) and how it is shared now."""

    cap: float
    sharing: int  # uploaders with a job
    share: float  # each one's share


@dataclass(frozen=True)
class Snapshot:
    """Everything the views show, copied under the supervisor's lock at monotonic ``now``."""

    now: float
    last_tick: float
    enabled: bool
    session: Session | None
    draining: bool
    recovery_done: bool
    setup_problems: tuple[str, ...]
    lease_lost: str | None
    owner: str  # this life's lease token
    replica: str
    auth_method: str
    stats: StatsSnapshot
    gave_up: tuple[GivenUp, ...]
    staging: StagingSnapshot
    queue: QueueSnapshot
    slots: tuple[SlotSnapshot, ...]  # the scanner first, then the uploaders
    stuck: Mapping[str, int]  # killed children the kernel keeps past the reap grace, by kind
    killed_unreaped: int
    storage: StorageHealth  # the snapshot's own copy
    rate: RateSnapshot
    sessions: tuple[SessionRow, ...]
    older_sessions: OlderRow
    liveness_timeout_s: float
    max_stuck_children: int
    auth_failure_exit_s: float

    @property
    def flights(self) -> tuple[SlotSnapshot, ...]:
        """The uploader slots with a job."""
        return tuple(slot for slot in self.slots[1:] if slot.job)

    @property
    def stuck_children(self) -> int:
        return sum(self.stuck.values())


def session_rows(
    stats: Stats, queued: Counter[SessionKey], in_flight: Counter[SessionKey]
) -> tuple[tuple[SessionRow, ...], OlderRow]:
    """The kept sessions (least recent first) and the folded aggregate, with work counts.

    A session with a file in flight is listed even if folded (at most one
    per uploader: still bounded). Files queued for folded sessions (found
    in ``.processing`` at start, say) are counted in the aggregate: listing
    each such session would unbound the view again.

    Reads the live counters: called under the supervisor's lock.
    """
    keys = [*stats.sessions, *(k for k in in_flight if k not in stats.sessions)]
    kept = tuple(
        _session_row(stats.sessions.get(key) or SessionCounters(*key), queued[key], in_flight[key])
        for key in keys
    )
    listed = set(keys)
    older = stats.older
    return kept, OlderRow(
        count=older.count,
        files_done=older.files_done,
        bytes_done=older.bytes_done,
        failed=older.failed,
        quarantined=older.quarantined,
        queued=sum(n for key, n in queued.items() if key not in listed),
    )


def _session_row(counters: SessionCounters, queued: int, in_flight: int) -> SessionRow:
    return SessionRow(
        date=counters.date,
        session=counters.session,
        files_done=counters.files_done,
        bytes_done=counters.bytes_done,
        failed=counters.failed,
        quarantined=counters.quarantined,
        queued=queued,
        in_flight=in_flight,
    )


# The views


def health(snap: Snapshot) -> tuple[bool, str]:
    """Live if the loop ticks and every slot has beaten within the liveness timeout."""
    now = snap.now
    if now - snap.last_tick > LOOP_STALE_S:
        return False, f"supervisor loop has not ticked for {now - snap.last_tick:.0f} s"
    problems = [f"folders unusable: {problem}" for problem in snap.setup_problems]
    if snap.lease_lost:
        problems.append(f"lease lost: {snap.lease_lost}")
    # A slot held back only while killed children are still dying is no
    # problem yet; once the kernel keeps them past the grace, it is.
    stuck = snap.stuck_children >= max(1, snap.max_stuck_children)
    for slot in snap.slots:
        age = slot.live_age
        if slot.held_back and stuck:
            problems.append(f"{slot.role} {slot.held_back}")
        elif age <= snap.liveness_timeout_s:
            continue
        elif slot.stalled:
            problems.append(
                f"{slot.role} has made no progress for {age:.0f} s: its "
                f"children stall (now {slot.state}) and are killed and replaced"
            )
        else:
            problems.append(f"{slot.role} heartbeat is {age:.0f} s old")
    return (not problems), "; ".join(problems)


def status_view(snap: Snapshot) -> dict[str, Any]:
    """Everything an operator needs, as plain JSON-ready data (``/v1/status``)."""
    session = snap.session
    return {
        "enabled": snap.enabled,
        "active_session": session.name if session and snap.enabled else None,
        "session": _session_view(session),
        **_totals(snap.stats),
        "draining": snap.draining,
        "recovery_done": snap.recovery_done,
        "setup_problems": list(snap.setup_problems),
        "gave_up": [_fields_view(entry) for entry in snap.gave_up],
        "staging": staging_view(snap.staging),
        "queue": {
            "depth": snap.queue.depth,
            "recovered": snap.queue.recovered,
            "new": snap.queue.new,
            "retrying": snap.queue.retrying,
            "waiting_for_staging": int(snap.queue.parked),
            "max": snap.queue.max_size,
            "dropped_full": snap.queue.dropped,
        },
        "in_flight": [_flight_view(slot) for slot in snap.flights],
        "children": [_child_view(slot) for slot in snap.slots],
        "stuck_children": snap.stuck_children,
        "killed_unreaped": snap.killed_unreaped,
        "auth_method": snap.auth_method,
        "storage": storage_view(snap),
        "upload_rate_cap": rate_view(snap.rate),
        "replica": {
            "id": snap.replica,
            "lease": snap.owner,
            "lease_lost": snap.lease_lost,
        },
        "sessions": [_fields_view(row) for row in snap.sessions],
        "older_sessions": {
            "count": snap.older_sessions.count,
            "files_done": snap.older_sessions.files_done,
            "bytes_done": snap.older_sessions.bytes_done,
            "failed": snap.older_sessions.failed,
            "quarantined": snap.older_sessions.quarantined,
            "queued": snap.older_sessions.queued,
        },
    }


def rate_view(rate: RateSnapshot) -> dict[str, Any]:
    """The upload rate cap in force and how it is shared now (``/v1/limits``)."""
    return {
        "max_mbps": rate.cap / 1e6,
        "bytes_per_second": round(rate.cap),
        "uploaders_sharing": rate.sharing,
        "share_bytes_per_second": round(rate.share),
    }


def staging_view(staging: StagingSnapshot) -> dict[str, Any]:
    return {
        "budget_bytes": staging.budget_bytes,
        "filesystem_bytes": staging.filesystem_bytes,
        "reserved_bytes": staging.reserved_bytes,
        "window_bytes": staging.window_bytes,
        "windowed_in_flight": list(staging.windowed_in_flight),
        "windowed_total": staging.windowed_total,
        "waiting_for_space": staging.waiting_for_space,
    }


def storage_view(snap: Snapshot) -> dict[str, Any]:
    """The ``storage`` section of ``/v1/status``."""
    return snap.storage.view(snap.now, snap.auth_failure_exit_s)


def _totals(stats: StatsSnapshot) -> dict[str, Any]:
    return {
        "processed_ok": stats.processed_ok,
        "processed_err": stats.processed_err,
        "last_error": stats.last_error,
        "bytes_ok": stats.bytes_ok,
        "last_success_at": stats.last_success_at,
        "skipped_gone": stats.skipped,
        "quarantined": stats.quarantined,
        "gave_up_by_stage": dict(stats.gave_up),
        "interrupted": stats.interrupted,
        "recovered": stats.recovered_total,
        "scan": {
            "polls": stats.scans,
            "errors": stats.scan_errors,
            "last_seen": stats.last_scan_seen,
            "last_stable": stats.last_scan_stable,
            "last_seconds": round(stats.last_scan_seconds, 4),
        },
        "backlog": {"files": stats.backlog_files, "bytes": stats.backlog_bytes},
        "restarts": dict(stats.restarts),
        "kills": dict(stats.kills),
    }


def _session_view(session: Session | None) -> dict[str, Any] | None:
    if session is None:
        return None
    return {
        "session_name": session.name,
        "encoded_session": session.encoded,
        "date_prefix": session.date,
        "blob_prefix": session.blob_prefix,
    }


def _fields_view(row: SessionRow | GivenUp) -> dict[str, Any]:
    """A flat snapshot row as JSON keys, in field order (its fields are the API's names)."""
    return {name: getattr(row, name) for name in row.__dataclass_fields__}


def _flight_view(slot: SlotSnapshot) -> dict[str, Any]:
    assert slot.job is not None
    return {
        "file": slot.job.name,
        "date": slot.job.date,
        "session": slot.job.session,
        "blob": slot.job.blob_name,
        "stage": slot.state,
        "bytes_done": slot.bytes_done,
        "bytes_total": slot.bytes_total,
        "seconds": round(slot.job_seconds, 1),
        "worker": slot.role,
        "staging": "window" if slot.job.window else "whole",
        "staging_reserved_bytes": slot.reserved,
    }


def _child_view(slot: SlotSnapshot) -> dict[str, Any]:
    return {
        "role": slot.role,
        "pid": slot.pid,
        "state": slot.state,
        "file": slot.file,
        "heartbeat_age_s": round(slot.beat_age, 2),
        "waiting_on": slot.waiting or None,
        "file_syscall_age_s": round(slot.syscall_age, 2) if slot.syscall_age is not None else None,
        "restarts": slot.restarts,
        "held_back": slot.held_back,
    }
