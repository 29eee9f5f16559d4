"""The supervisor: one thread in the parent that owns every child and all state.

Modelled on gunicorn's arbiter. One loop, a few times a second, never
blocking for longer than a tick:

1. wait (with a timeout) for messages on the children's pipes and apply them;
2. respawn children that exited; SIGKILL and replace children whose heartbeat
   is older than ``APP_CHILD_STALL_TIMEOUT_S``, or whose beats say a side
   thread has been in one file syscall for that long, and put their file
   back. A child that beats while it waits on the blob endpoint is never
   killed: an outage of storage is shown (``storage``), not "cured";
3. reap killed children with WNOHANG; those the kernel keeps (stuck in a hung
   NFS call) are counted, and past ``APP_MAX_STUCK_CHILDREN`` no more are made;
4. hand queued jobs to idle uploaders.

The HTTP handlers call the public methods, which take the lock for a moment
and never wait on the loop, so the API answers whatever the children do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait

from ingestd import config, leases, scanner, uploader
from ingestd.childhandle import ChildProcess
from ingestd.config import Settings
from ingestd.exitcodes import EXIT_AUTH
from ingestd.messages import (
    BOUNDED_STAGES,
    Backlog,
    Beat,
    ChildState,
    Claimed,
    Done,
    Failed,
    GaveUp,
    Gone,
    Job,
    LeaseGone,
    Quarantined,
    RateLimit,
    Recovered,
    RecoveryDone,
    ReleaseLease,
    ScanControl,
    ScanDone,
    ScanError,
    SetupProblem,
    Stable,
    Stage,
    Stop,
    StorageFailing,
    StorageOk,
)
from ingestd.sessions import Session
from ingestd.stats import SessionCounters, Stats
from ingestd.status import (
    GivenUp,
    Observer,
    QueueSnapshot,
    RateSnapshot,
    SlotSnapshot,
    Snapshot,
    StagingSnapshot,
    StatsSnapshot,
    Unobserved,
    session_rows,
)
from ingestd.storagehealth import StorageHealth
from ingestd.workqueue import OutageBackoff, WorkQueue

log = logging.getLogger(__name__)

TICK_S = 0.2
REAP_GRACE_S = 2.0
"""A killed child still unreaped after this long is stuck in the kernel."""
MAX_RESPAWN_DELAY_S = 30.0
MAX_RETRY_DELAY_S = 60.0
STAGING_LOOKAHEAD = 64
"""Queued jobs looked at per free uploader for one whose staging reservation fits."""
SCANNER = "scanner"
GAVE_UP_SHOWN = 100
"""Files given up on that /v1/status lists (the newest); older ones are only counted."""
RATE_SEND_MAX_BEAT_AGE_S = 2.0
"""A rate share goes only to a child that beat this recently (busy ones beat every
0.25 s, idle ones every 1 s): one stuck in a syscall reads nothing, and at most
one message per tick must not pile up in its pipe until a send would block."""


@dataclass
class Slot:
    """A place for one child: the scanner, or uploader number ``index``."""

    role: str
    child: ChildProcess | None = None
    state: ChildState = ChildState.STARTING
    file: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    last_beat: float = field(default_factory=time.monotonic)
    first_beat: float | None = None  # the current child's first message
    stalled_since: float | None = None  # see Supervisor._on_stall
    restarts: int = 0
    job: Job | None = None
    job_started: float = 0.0
    respawn_at: float = 0.0
    quick_deaths: int = 0
    held_back: str | None = None  # why no child runs here now
    rate_sent: float | None = None  # the rate share this child was last sent
    waiting: str = ""  # what its work loop waits on ("network"), per its last beat
    syscall_since: float | None = None  # a side thread's file syscall in progress since

    @property
    def is_uploader(self) -> bool:
        return self.role != SCANNER

    def beat_age(self, now: float) -> float:
        return now - self.last_beat

    def live_age(self, now: float) -> float:
        """Heartbeat age for liveness: a replacement does not hide a stall."""
        return now - (self.stalled_since if self.stalled_since is not None else self.last_beat)


class Supervisor:
    """Owns the children, the work queue, the sessions and the counters."""

    def __init__(
        self, settings: Settings, auth_method: str, observer: Observer | None = None
    ) -> None:
        self.settings = settings
        # The children never need the API token: they get settings without it
        # (and ingestd.cli keeps it out of the environment they inherit).
        self.child_settings = settings.model_copy(update={"api_token": None})
        self.auth_method = auth_method
        self.observer: Observer = observer or Unobserved()  # the histograms (ingestd.metrics)
        self.lock = threading.Lock()
        self.queue = WorkQueue(settings.max_queue_size)
        self.outage = OutageBackoff(MAX_RETRY_DELAY_S)
        self.stats = Stats(history=settings.session_history)
        self.slots = [Slot(SCANNER)] + [
            Slot(f"uploader-{i}") for i in range(1, settings.worker_concurrency + 1)
        ]
        self.stuck: list[ChildProcess] = []
        self.session: Session | None = None
        self.enabled = False
        self.recovery_done = False
        self.setup_problems: tuple[str, ...] = ()
        self.staging_capacity = 0  # the staging filesystem's size, from the scanner's check
        self.staging_holes = True  # staging can punch holes (windows possible), the same check
        self.staging_parked: Job | None = None  # the oldest job waiting for staging space
        self.gave_up: deque[GivenUp] = deque(maxlen=GAVE_UP_SHOWN)
        self.unclaimable: dict[tuple[str, str, str], tuple[int, int] | None] = {}
        self.draining = False
        self.drain_deadline = 0.0
        self.drained = threading.Event()
        self.last_tick = time.monotonic()
        self.started_at = time.time()
        self._scan_sent: bool | None = None
        self._first_scanner = True
        self._stopping = threading.Event()
        self.rate_cap = settings.azure_max_mbps * 1e6  # bytes/s for the pod; 0 = none
        # This life's lease token: claims are recorded under it (ingestd.leases).
        self.owner = leases.new_token(leases.replica_name(settings.replica_id))
        self.lease_lost: str | None = None
        self.storage = StorageHealth()
        self.exit_code: int | None = None  # set when the service must exit non-zero
        self.exit_line: str | None = None  # and the one line that says why
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.on_drained: Callable[[], None] | None = None

    # Lifecycle

    def start(self) -> None:
        with self.lock:
            for slot in self.slots:
                self._spawn(slot)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop taking new work; in-flight uploads get ``APP_SHUTDOWN_GRACE_S`` to finish.

        Safe from a signal handler: it only sets two attributes, the loop does the rest.
        """
        self.drain_deadline = time.monotonic() + self.settings.shutdown_grace_s
        self.draining = True

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop and SIGKILL every child; wait for none of them.

        Files in flight stay in ``.processing`` for the next start.
        """
        self._stopping.set()
        self._thread.join(timeout=timeout)
        with self.lock:
            for slot in self.slots:
                if slot.child is not None:
                    slot.child.kill()
                    self.stuck.append(slot.child)
                    slot.child = None
            deadline = time.monotonic() + timeout
            while self.stuck and time.monotonic() < deadline:
                self._reap_stuck(time.monotonic())
                time.sleep(0.05)
        if self.stuck:
            log.warning("%d children could not be reaped at exit", len(self.stuck))

    # Sessions (called by the API)

    def start_session(self, session: Session) -> Session:
        """Make ``session`` the active one and start scanning.

        Asking again for the session already active returns it unchanged, so
        a client retrying its request does not open a new date prefix.
        """
        with self.lock:
            if self.enabled and self.session and self.session.name == session.name:
                return self.session
            self.session = session
            self.enabled = True
            self.stats.start(session.date, session.encoded)
        log.info("session started", extra={"session": session.encoded, "date": session.date})
        return session

    def stop_session(self) -> Session | None:
        with self.lock:
            session, self.enabled = self.session, False
            self.stats.on_backlog(0, 0)  # not watching: nothing waits for this replica
        if session:
            log.info("session stopped", extra={"session": session.encoded, "date": session.date})
        return session

    # The upload rate cap (called by the API)

    def set_rate_cap(self, max_mbps: float) -> RateSnapshot:
        """Change the pod's upload rate cap now; uploaders get their new shares next tick.

        Kept in memory only: a restart goes back to ``APP_AZURE_MAX_MBPS``.
        Returns the cap and its shares as they are right after the change.
        """
        with self.lock:
            old, self.rate_cap = self.rate_cap, max_mbps * 1e6
            rate = self._rate_snapshot()
        log.info("upload rate cap changed from %s to %s", _mbps(old), _mbps(self.rate_cap))
        return rate

    def _rate_snapshot(self) -> RateSnapshot:
        busy = sum(1 for slot in self.slots[1:] if slot.job)
        return RateSnapshot(cap=self.rate_cap, sharing=busy, share=self._rate_share())

    def _rate_share(self) -> float:
        """Each uploader's share: the cap split among those with a job.

        Idle uploaders send nothing, so counting only the busy ones lets them
        use all of it (one file alone gets the whole cap); idle ones hold the
        same share for when a job comes. Shares change as jobs start and end.
        """
        busy = sum(1 for slot in self.slots[1:] if slot.job)
        return self.rate_cap / max(1, busy) if self.rate_cap > 0 else 0.0

    def _share_rate(self, now: float) -> None:
        """Send each live uploader its share, when it differs from what it has."""
        share = self._rate_share()
        for slot in self.slots[1:]:
            child = slot.child
            if (
                child is None
                or slot.rate_sent == share
                or slot.beat_age(now) > RATE_SEND_MAX_BEAT_AGE_S
            ):
                continue
            if child.send(RateLimit(share)):
                slot.rate_sent = share

    # The loop

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad message
                log.exception("supervisor tick failed")
                time.sleep(TICK_S)

    def tick(self) -> None:
        ready = wait(self._connections(), timeout=TICK_S)
        with self.lock:
            now = time.monotonic()
            for conn in ready:
                self._drain(conn, now)
            self._check_children(now)
            self._reap_stuck(now)
            self._control_scanner()
            self._dispatch(now)
            self._share_rate(now)
            self._check_auth(now)
            self._finish_drain(now)
            self.last_tick = time.monotonic()

    def _connections(self) -> list[Connection]:
        with self.lock:
            return [s.child.conn for s in self.slots if s.child and s.child.conn]

    def _slot_of(self, conn: object) -> Slot | None:
        return next((s for s in self.slots if s.child and s.child.conn is conn), None)

    def _drain(self, conn: object, now: float) -> None:
        """Apply every message waiting on one child's pipe."""
        slot = self._slot_of(conn)
        if slot is None:
            return
        try:
            while slot.child and slot.child.conn and slot.child.conn.poll(0):
                self._handle(slot, slot.child.conn.recv(), now)
        except (EOFError, OSError):
            # The child closed its end: it is exiting. _check_children reaps it.
            if slot.child:
                slot.child.close_pipe()

    # Messages

    def _handle(self, slot: Slot, message: object, now: float) -> None:
        slot.last_beat = now
        if slot.first_beat is None:
            slot.first_beat = now
        if (
            slot.stalled_since is not None
            and now - slot.first_beat >= self.settings.child_stall_timeout_s
        ):
            slot.stalled_since = None  # this child kept beating for a whole stall period
        if isinstance(message, Beat):
            if slot.job is not None and message.state == ChildState.IDLE:
                # Sent before the child took the job that is on its way (a
                # child with a job says idle only after its result, which
                # clears slot.job first): the job's state stands.
                return
            slot.state, slot.file = message.state, message.file
            slot.bytes_done, slot.bytes_total = message.bytes_done, message.bytes_total
            slot.waiting = message.waiting
            slot.syscall_since = now - message.syscall_age if message.syscall_age > 0 else None
        elif isinstance(message, StorageOk):
            self._storage_ok(now)
        elif isinstance(message, StorageFailing):
            self.storage.failed(message.kind, message.error, now, time.time())
        elif isinstance(message, Stable):
            self._on_stable(message)
        elif isinstance(message, Recovered):
            self._on_recovered(message)
        elif isinstance(message, RecoveryDone):
            self.recovery_done = True
            self.stats.recovered_total += message.count
            log.info("recovery found %d claimed files in .processing", message.count)
        elif isinstance(message, ScanDone):
            self.stats.on_scan(message.seen, message.stable, message.seconds)
            self.observer.scanned(message.seconds)
        elif isinstance(message, ScanError):
            self.stats.scan_errors += 1
            self.stats.last_error = message.error
        elif isinstance(message, SetupProblem):
            self._on_setup(message)
        elif isinstance(message, Backlog):
            if self.enabled:
                self.stats.on_backlog(message.files, message.bytes)
        elif isinstance(message, LeaseGone):
            self._on_lease_gone(message)
        elif isinstance(message, Claimed):
            if slot.job is not None and slot.job.key == message.key:
                slot.job = replace(slot.job, claimed=True, maybe_claimed=False)
        elif isinstance(message, (Done, Failed, Gone, Quarantined, GaveUp)):
            self._on_result(slot, message, now)

    def _on_stable(self, message: Stable) -> None:
        if not self.enabled or self.session is None or self.draining:
            return  # found after a stop: it stays in incoming for the next session
        for name, size, mtime in message.files:
            job = Job(
                name=name,
                date=self.session.date,
                session=self.session.encoded,
                seen=(size, mtime),
                size=size,
            )
            if job.key in self.unclaimable:
                if self.unclaimable[job.key] == job.seen:
                    continue  # given up on this version; a changed file is tried afresh
                del self.unclaimable[job.key]
            self.queue.add_new(job)

    def _on_setup(self, message: SetupProblem) -> None:
        if message.staging_bytes:
            self.staging_capacity = message.staging_bytes
        if not message.problems:
            self.staging_holes = message.staging_holes
        if message.problems and message.problems != self.setup_problems:
            self.stats.last_error = "; ".join(message.problems)
        elif not message.problems and self.setup_problems:
            log.info("the folders are usable again")
        self.setup_problems = message.problems

    def _on_lease_gone(self, message: LeaseGone) -> None:
        """Another replica took our files (we were taken for dead): take no more work.

        Uploads in flight may finish (the same bytes, so a second upload by
        the heir is harmless); /healthz fails so the pod is restarted with a
        new lease.
        """
        self.lease_lost = message.reason
        self.stats.last_error = f"lease lost: {message.reason}"
        log.error("lease lost: %s; no more work is dispatched", message.reason)

    def _on_recovered(self, message: Recovered) -> None:
        if self.draining:
            return  # ours now; the lease released at the end hands it on at once
        job = Job(
            name=message.name,
            date=message.date,
            session=message.session,
            claimed=True,
            size=message.size,
        )
        self.queue.add_recovered(job)

    def _on_result(
        self, slot: Slot, message: Done | Failed | Gone | Quarantined | GaveUp, now: float
    ) -> None:
        job = message.job
        slot.job, slot.file, slot.state = None, None, ChildState.IDLE
        counters = self.stats.session(job.date, job.session)
        if isinstance(message, Done):
            self.queue.finish(job)
            self._storage_ok(now)
            if job.window:
                self.stats.windowed_total += 1
            self.stats.on_done(counters, message.size)
            self.observer.uploaded(message.seconds, message.size)
        elif isinstance(message, Gone):
            self.queue.finish(job)
            self.stats.skipped += 1
        elif isinstance(message, Quarantined):
            self.queue.finish(job)
            self.stats.on_quarantined(counters, f"{job.blob_name}: {message.error}")
        elif isinstance(message, GaveUp):
            self._on_gave_up(message, counters)
        else:
            self.stats.on_failed(counters, f"{job.blob_name}: {message.error}")
            self.queue.retry(job, self._retry_at(message, now))

    def _storage_ok(self, now: float) -> None:
        self.outage.reset()
        self.storage.ok(now, time.time())

    def _check_auth(self, now: float) -> None:
        """Storage has rejected the credential for ``APP_AUTH_FAILURE_EXIT_S``: stop.

        Retrying cannot help (a removed role, a rotated key, an expired SAS),
        so no more work is taken, in-flight files settle as in a drain (none
        is deleted without its commit), and the service exits with code 3;
        the restart's startup check then names the keys to fix.
        """
        failing_for = self.storage.auth_failing_for(now)
        if self.draining or failing_for < self.settings.auth_failure_exit_s:
            return
        self.exit_code = EXIT_AUTH
        self.exit_line = (
            f"cannot continue: blob storage has rejected the {self.auth_method} for "
            f"{failing_for:.0f} s (APP_AUTH_FAILURE_EXIT_S={self.settings.auth_failure_exit_s:g}):"
            f" {self.storage.error}; stopped taking work, exiting with code {EXIT_AUTH}"
        )
        log.critical(self.exit_line)
        self.begin_drain()

    def _on_gave_up(self, message: GaveUp, counters: SessionCounters) -> None:
        """A step failed too often: no more tries in this run; the file stays on NFS.

        A file that could never be claimed stays in incoming and is offered
        again only once it changes; one that could not be deleted or moved
        to ``.failed`` stays in ``.processing`` until the next start.
        """
        job = message.job
        self.queue.finish(job)
        if message.stage == Stage.CLAIM:
            self.unclaimable[job.key] = job.seen
        self.stats.on_gave_up(counters, message.stage, f"{job.blob_name}: {message.error}")
        self.gave_up.append(
            GivenUp(
                file=job.name,
                date=job.date,
                session=job.session,
                stage=message.stage,
                error=message.error,
                stays_at=message.path,
                at=time.time(),
            )
        )

    def _retry_at(self, failed: Failed, now: float) -> float:
        """Back off per file for its own failures, globally for outages.

        A file's own failures wait at least ``APP_MIN_FILE_AGE_S``: one that
        changed while it was uploaded gets that long to become stable again.
        Failed cleanups and moves to ``.failed`` back off per file as well.
        """
        if failed.counted:
            delay = max(self.settings.min_file_age_s, 2.0**failed.job.attempts)
            return now + min(MAX_RETRY_DELAY_S, delay)
        if failed.stage in BOUNDED_STAGES:
            return now + min(MAX_RETRY_DELAY_S, 2.0**failed.job.tries)
        return self.outage.retry_at(now)

    # Children

    def _spawn(self, slot: Slot) -> None:
        target: Callable[..., None]
        args: tuple[object, ...]
        if slot.role == SCANNER:
            target, args = scanner.main, (self.child_settings, self._first_scanner, self.owner)
            self._first_scanner = False
            self._scan_sent = None
        else:
            target, args = (
                uploader.main,
                (self.child_settings, self.auth_method, slot.role, self.owner),
            )
        slot.child = ChildProcess(slot.role, target, args)
        slot.state, slot.file, slot.last_beat, slot.held_back = (
            ChildState.STARTING,
            None,
            time.monotonic(),
            None,
        )
        slot.first_beat = None
        slot.rate_sent = None
        slot.waiting, slot.syscall_since = "", None
        log.info("started %s (pid %d)", slot.role, slot.child.pid)

    def _check_children(self, now: float) -> None:
        for slot in self.slots:
            child = slot.child
            if child is None:
                self._maybe_respawn(slot, now)
            elif child.exited():
                self._on_exit(slot, child, now)
            elif slot.beat_age(now) > self.settings.child_stall_timeout_s:
                self._on_stall(slot, child, now)
            elif (
                slot.syscall_since is not None
                and now - slot.syscall_since > self.settings.child_stall_timeout_s
            ):
                self._on_stall(slot, child, now, in_syscall=True)

    def _on_exit(self, slot: Slot, child: ChildProcess, now: float) -> None:
        lived, code = now - child.started, child.exitcode
        if self.drained.is_set():
            # Told to stop (Stop, once drained): an expected exit, not replaced.
            log.info("%s (pid %d) stopped after the drain", slot.role, child.pid)
            child.release()
            slot.child, slot.state = None, ChildState.STOPPED
            return
        log.warning(
            "%s (pid %d) exited with code %s after %.1f s", slot.role, child.pid, code, lived
        )
        child.release()
        slot.child = None
        self._take_back_job(slot, now, f"{slot.role} exited with code {code}")
        slot.quick_deaths = slot.quick_deaths + 1 if lived < 10 else 0
        slot.respawn_at = (
            now + min(MAX_RESPAWN_DELAY_S, 0.5 * 2**slot.quick_deaths) if slot.quick_deaths else now
        )
        slot.restarts += 1
        self.stats.restarts[self._role_kind(slot)] += 1
        self._maybe_respawn(slot, now)

    def _on_stall(
        self, slot: Slot, child: ChildProcess, now: float, in_syscall: bool = False
    ) -> None:
        """SIGKILL a silent child, or one with a thread stuck in a file syscall, and replace it.

        The slot stays ``stalled_since`` the killed child's last beat (or the
        start of the stuck syscall) until a replacement keeps beating for a
        whole stall period, so a mount that stays frozen fails liveness after
        ``APP_LIVENESS_TIMEOUT_S`` even though each replacement beats once at
        its start and then blocks.
        """
        stalled_at = slot.syscall_since if in_syscall and slot.syscall_since else slot.last_beat
        age = now - stalled_at
        if slot.stalled_since is None:
            slot.stalled_since = stalled_at
        silence = (
            "has had a block thread in one staging read" if in_syscall else "sent no heartbeat"
        )
        log.error(
            "%s (pid %d) %s for %.0f s while %s%s: killing it",
            slot.role,
            child.pid,
            silence,
            age,
            slot.state,
            f" {slot.file}" if slot.file else "",
            extra={"file": slot.file},
        )
        child.kill()
        self.stuck.append(child)
        slot.child = None
        self._take_back_job(slot, now, f"{slot.role} stalled for {age:.0f} s in {slot.state}")
        slot.restarts += 1
        self.stats.restarts[self._role_kind(slot)] += 1
        self.stats.kills[self._role_kind(slot)] += 1
        slot.respawn_at = now
        self._maybe_respawn(slot, now)

    def _maybe_respawn(self, slot: Slot, now: float) -> None:
        if self._stopping.is_set() or self.drained.is_set() or now < slot.respawn_at:
            return
        if slot.is_uploader and self.draining:
            return
        # Every killed child not reaped yet counts, even one killed a moment
        # ago: otherwise children killed within REAP_GRACE_S of each other
        # would all be replaced and the tree would outgrow the bound. Only
        # those older than the grace make /healthz fail (see status.health).
        unreaped = len(self.stuck)
        if unreaped >= self.settings.max_stuck_children:
            slot.held_back = f"not respawned: {unreaped} killed children are stuck in the kernel"
            slot.state = ChildState.HELD
            return
        self._spawn(slot)

    def _take_back_job(self, slot: Slot, now: float, why: str) -> None:
        """A child died holding a job: its file stays claimed, so run it again."""
        job = slot.job
        slot.job = None
        if job is None:
            return
        self.stats.interrupted += 1
        self.stats.last_error = f"{job.blob_name}: {why}"
        # Whether the rename happened is known only if the child said so
        # (Claimed); if not, the retry looks in .processing before it claims.
        self.queue.retry(replace(job, maybe_claimed=not job.claimed), now + 1.0)

    def _reap_stuck(self, now: float) -> None:
        still = []
        for child in self.stuck:
            if child.exited():
                child.release()
            else:
                still.append(child)
        self.stuck = still

    @staticmethod
    def _role_kind(slot: Slot) -> str:
        return "uploader" if slot.is_uploader else SCANNER

    # Work

    def _control_scanner(self) -> None:
        scan = self.enabled and not self.draining
        slot = self.slots[0]
        if slot.child and self._scan_sent != scan and slot.child.send(ScanControl(scan)):
            self._scan_sent = scan

    def _dispatch(self, now: float) -> None:
        if not self.recovery_done or self.draining or self.lease_lost:
            return
        later: list[Job] = []
        try:
            for slot in self.slots[1:]:
                if slot.child is None or slot.child.conn is None or slot.job is not None:
                    continue
                job = self._next_job(now, later)
                if job is None:
                    return
                if not slot.child.send(job):
                    self.queue.retry(job, now)
                    continue
                slot.job, slot.job_started = job, now
                slot.state, slot.file, slot.bytes_done, slot.bytes_total = (
                    ChildState.CLAIMING,
                    job.name,
                    0,
                    0,
                )
                slot.last_beat = now
        finally:
            for job in later:  # no room in staging now: their turn comes again
                self.queue.retry(job, now + TICK_S)

    # The staging budget

    def staging_budget(self) -> int:
        """Bytes of staging all uploaders share: APP_STAGING_BUDGET, else the whole filesystem."""
        return self.settings.staging_budget or self.staging_capacity

    def _staging_reserved(self) -> int:
        return sum(_reservation(slot.job) for slot in self.slots[1:] if slot.job)

    def _plan_staging(self, job: Job, budget: int) -> Job:
        """Stage ``job`` whole, or through a window; see the README, "Staging window".

        A file is staged whole if it is no larger than what the budget
        leaves once every other uploader has a window (and never when it is
        no larger than a window: a window would save nothing). Larger files
        go through a window. Sizes are those the scan or recovery reported.
        On a staging filesystem that cannot punch holes every file is staged
        whole (the scanner's setup check says which, and logs it).
        """
        settings = self.settings
        if not self.staging_holes:  # a window gives space back by punching holes
            return replace(job, window=0)
        floor = settings.azure_max_block_size + config.STAGING_COPY_CHUNK
        window = max(min(settings.staging_window_bytes(), budget), floor)
        whole_max = max(window, budget - (settings.worker_concurrency - 1) * window)
        if job.size > whole_max and job.size > settings.azure_max_single_put_size:
            return replace(job, window=window)
        return replace(job, window=0)

    def _next_job(self, now: float, later: list[Job]) -> Job | None:
        """The next job whose staging reservation (its size, or a window) fits the budget.

        A job that does not fit now waits, and is not failed: the oldest
        such job is parked, and others may pass it only if they leave it its
        room, so it runs as soon as files in flight finish. A job that could
        never fit (a budget smaller than one window) runs when nothing else
        is in flight, and meets the disk as it is (see
        ``Uploader._staging_failure``).
        """
        budget = self.staging_budget()
        if budget <= 0:
            return self.queue.take(now)
        free = budget - self._staging_reserved()
        busy = any(slot.job for slot in self.slots[1:])
        parked = self.staging_parked
        if parked is not None:
            if _reservation(parked) <= free or not busy:
                self.staging_parked = None
                return parked
            free -= _reservation(parked)
        for _ in range(STAGING_LOOKAHEAD):
            job = self.queue.take(now)
            if job is None:
                return None
            job = self._plan_staging(job, budget)
            if _reservation(job) <= free or (not busy and self.staging_parked is None):
                return job
            if self.staging_parked is None:
                self.staging_parked = job
                free -= _reservation(job)
                log.info(
                    "%s waits for staging space: it needs %d bytes, %d of %d are free",
                    job.blob_name,
                    _reservation(job),
                    free + _reservation(job),
                    budget,
                )
            else:
                later.append(job)
        return None

    def _staging_snapshot(self) -> StagingSnapshot:
        windowed = [slot.job.blob_name for slot in self.slots[1:] if slot.job and slot.job.window]
        parked = self.staging_parked
        return StagingSnapshot(
            budget_bytes=self.staging_budget(),
            filesystem_bytes=self.staging_capacity,
            reserved_bytes=self._staging_reserved(),
            window_bytes=self.settings.staging_window_bytes(),
            windowed_in_flight=tuple(windowed),
            windowed_total=self.stats.windowed_total,
            waiting_for_space=parked.blob_name if parked else None,
        )

    def _finish_drain(self, now: float) -> None:
        """Once nothing is in flight, or the grace period is over, let the server exit."""
        if not self.draining or self.drained.is_set():
            return
        busy = [slot.job.blob_name for slot in self.slots[1:] if slot.job]
        if busy and now < self.drain_deadline:
            return
        if busy:
            log.warning(
                "grace period over with %d uploads in flight; they stay in "
                ".processing for the next start: %s",
                len(busy),
                ", ".join(busy),
            )
        else:
            log.info("drained: no upload in flight")
            scanner_slot = self.slots[0]
            if scanner_slot.child:  # nothing of ours moves any more: hand on what is left
                scanner_slot.child.send(ReleaseLease())
        for slot in self.slots:
            if slot.child:
                slot.child.send(Stop())
        self.drained.set()
        if self.on_drained:
            self.on_drained()

    # The snapshot the views are built from (ingestd.status)

    def snapshot(self, now: float | None = None) -> Snapshot:
        """What ``/v1/status``, ``/healthz``, ``/v1/limits`` and a scrape show, read in one go.

        Taken under the lock and cheap: values and immutable records are
        copied (the slots, the killed children, the kept sessions: all
        bounded), nothing is rendered and nothing touches a file; the views
        are built from the copy, outside the lock. ``now`` (monotonic) is the
        time the ages are taken at, for tests that set the clock.
        """
        with self.lock:
            now = time.monotonic() if now is None else now
            stuck: dict[str, int] = {}
            for child in self.stuck:
                if child.killed_at and now - child.killed_at > REAP_GRACE_S:
                    kind = "scanner" if child.role == SCANNER else "uploader"
                    stuck[kind] = stuck.get(kind, 0) + 1
            queued = self.queue.waiting_by_session()
            if self.staging_parked is not None:  # taken from the queue, waiting for staging room
                queued[self.staging_parked.key[:2]] += 1
            flying = Counter(slot.job.key[:2] for slot in self.slots[1:] if slot.job)
            sessions, older = session_rows(self.stats, queued, flying)
            depth = self.queue.depth()
            settings = self.settings
            return Snapshot(
                now=now,
                last_tick=self.last_tick,
                enabled=self.enabled,
                session=self.session,
                draining=self.draining,
                recovery_done=self.recovery_done,
                setup_problems=self.setup_problems,
                lease_lost=self.lease_lost,
                owner=self.owner,
                replica=leases.replica_of(self.owner),
                auth_method=self.auth_method,
                stats=StatsSnapshot.of(self.stats),
                gave_up=tuple(self.gave_up),
                staging=self._staging_snapshot(),
                queue=QueueSnapshot(
                    recovered=depth["recovered"],
                    new=depth["new"],
                    retrying=depth["retrying"],
                    parked=self.staging_parked is not None,
                    max_size=self.queue.max_size,
                    dropped=self.queue.dropped,
                ),
                slots=tuple(self._slot_snapshot(slot, now) for slot in self.slots),
                stuck=stuck,
                killed_unreaped=len(self.stuck),
                storage=replace(self.storage),
                rate=self._rate_snapshot(),
                sessions=sessions,
                older_sessions=older,
                liveness_timeout_s=settings.liveness_timeout_s,
                max_stuck_children=settings.max_stuck_children,
                auth_failure_exit_s=settings.auth_failure_exit_s,
            )

    def _slot_snapshot(self, slot: Slot, now: float) -> SlotSnapshot:
        return SlotSnapshot(
            role=slot.role,
            kind=self._role_kind(slot),
            pid=slot.child.pid if slot.child else None,
            state=slot.state,
            file=slot.file,
            beat_age=slot.beat_age(now),
            live_age=slot.live_age(now),
            stalled=slot.stalled_since is not None,
            syscall_age=now - slot.syscall_since if slot.syscall_since is not None else None,
            waiting=slot.waiting,
            restarts=slot.restarts,
            held_back=slot.held_back,
            job=slot.job,
            job_seconds=now - slot.job_started,
            bytes_done=slot.bytes_done,
            bytes_total=slot.bytes_total,
            reserved=_reservation(slot.job) if slot.job else 0,
        )


def _reservation(job: Job) -> int:
    """The staging bytes a job holds: its window, or its whole size."""
    return job.window or job.size


def _mbps(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:g} MB/s" if bytes_per_s > 0 else "none"
