"""The messages that cross a child's pipe, in both directions.

They are small frozen dataclasses: each pickles to far less than PIPE_BUF, so
a write is atomic and a child killed mid-send cannot leave half a message.
The parent only ever learns about files through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

Signature = tuple[int, int, int]
"""What identifies one version of a file: (size, mtime_ns, inode)."""


class Stage(StrEnum):
    """The step of a file's upload that failed (``Failed.stage``, ``GaveUp.stage``).

    The uploader names it (``filesteps.StepError``); the supervisor decides
    from it how to retry. It shows as ``gave_up[].stage`` and the keys of
    ``gave_up_by_stage`` in ``/v1/status``, as the ``stage`` label of
    ``ingestd_files_given_up_total``, and in the uploader's "failed at" and
    "giving up" log lines. Members are ``str``: the JSON, the labels and the
    log lines carry the plain value (``"claim"``).
    """

    CLAIM = "claim"  # the rename into .processing (the file stays in incoming)
    COPY = "copy"  # reading NFS or writing the staging copy
    UPLOAD = "upload"  # a request to storage (blocks, put, commit)
    VERIFY = "verify"  # the file changed since it was read: not committed, or not deleted
    CLEANUP = "cleanup"  # deleting both copies after the commit
    QUARANTINE = "quarantine"  # the move to .failed
    INTERNAL = "internal"  # an unexpected error (a bug): costs one attempt


BOUNDED_STAGES = frozenset({Stage.CLEANUP, Stage.QUARANTINE})
"""Stages whose failures say nothing about the file's bytes: they do not count
towards ``.failed``, but are retried only ``APP_MAX_ATTEMPTS`` times (the
uploader counts them; the supervisor backs them off per file)."""


class ChildState(StrEnum):
    """What a child slot is doing: a child's own ``Beat.state``, or what the parent knows.

    A child says it in each beat (the scanner: ``idle``, ``checking``,
    ``recovering``, ``scanning``, ``backoff``; an uploader: ``idle``,
    ``claiming``, ``copying``, ``uploading``, ``cleaning``). The parent sets
    the others on the slot itself: ``starting`` (spawned, no beat yet; also
    what a child's channel repeats before its first beat), ``claiming`` (a
    job was just sent), ``idle`` (its result came back), ``held`` (not
    respawned while killed children are stuck), ``stopped`` (exited after a
    drain). It shows as ``children[].state`` and ``in_flight[].stage`` in
    ``/v1/status`` and in the parent's "killing it" / "stalled ... in" lines.
    Members are ``str``: the JSON and the log lines carry the plain value.
    """

    STARTING = "starting"
    IDLE = "idle"
    CHECKING = "checking"  # scanner: checking that the folders are usable
    RECOVERING = "recovering"  # scanner: a pass over .processing
    SCANNING = "scanning"  # scanner: polling incoming
    BACKOFF = "backoff"  # scanner: waiting after an NFS error
    CLAIMING = "claiming"
    COPYING = "copying"  # uploader: NFS to staging (blocks go out meanwhile)
    UPLOADING = "uploading"  # uploader: the rest of the blocks, then the commit
    CLEANING = "cleaning"  # uploader: deleting both copies after the commit
    HELD = "held"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Job:
    """Upload one file. ``name`` is the file name in incoming and in the blob.

    A job is known by its :attr:`key`, (date, session, name), never by the
    bare name: two files of one name may be claimed under two sessions.

    How far the file has got, as far as this instance knows:

    * ``claimed``: the rename into ``.processing`` is known to have happened
      (the child reported it, or recovery found the file there). The uploader
      carries on from ``.processing`` without a stability check.
    * ``maybe_claimed``: an uploader died holding the job, so the rename may
      or may not have happened. The retry takes the file from ``.processing``
      if it is there; otherwise it claims from incoming like a new job, with
      the stability check, so a newer, half-written file of that name is never
      taken for the one that was found stable.
    * ``uploaded``: the blob was committed from the version with this
      signature, but the file could not be deleted. A retry whose file still
      has that signature only cleans up.

    ``attempts`` counts failures that are the file's own (kept here as well
    as in the sidecar on NFS, so a sidecar that cannot be read cannot reset
    it); ``tries`` counts failed cleanups and quarantines, which are retried
    a bounded number of times as well.
    """

    name: str
    date: str
    session: str  # the encoded session, a single folder name
    claimed: bool = False
    maybe_claimed: bool = False
    seen: tuple[int, int] | None = None  # (size, mtime_ns) when found stable
    attempts: int = 0
    tries: int = 0
    uploaded: Signature | None = None
    size: int = 0  # bytes, as the scan or recovery found it (0: not known)
    window: int = 0  # >0: stage through a window of this many bytes, not whole

    @property
    def blob_name(self) -> str:
        return f"{self.date}/{self.session}/{self.name}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.date, self.session, self.name)


# parent -> scanner


@dataclass(frozen=True)
class ScanControl:
    """Start or stop polling incoming. Recovery runs once per scanner start."""

    enabled: bool


# parent -> any child


@dataclass(frozen=True)
class Stop:
    """Finish the current step and exit."""


# parent -> scanner


@dataclass(frozen=True)
class ReleaseLease:
    """The replica drained cleanly (no upload in flight): release the lease.

    Survivors then take whatever this replica still holds at their next
    pass, instead of waiting for the lease to expire.
    """


# parent -> uploader


@dataclass(frozen=True)
class RateLimit:
    """This uploader's share of the pod's upload rate cap, bytes/s; 0 means no cap.

    Applied at once, even mid-file: the uploader reads it off its pipe each
    time it beats, not only between jobs.
    """

    bytes_per_s: float


# scanner -> parent


@dataclass(frozen=True)
class Stable:
    """Files in incoming that have stopped changing: ``(name, size, mtime_ns)``."""

    files: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Recovered:
    """A claimed file in ``.processing`` that is this replica's to upload.

    Found at the scanner's start (its own, unowned, and dead replicas'
    claims) or by a later pass (a dead replica's, see ingestd.leases).
    """

    name: str
    date: str
    session: str
    size: int


@dataclass(frozen=True)
class RecoveryDone:
    """A pass over ``.processing`` is complete (``count`` files reported).

    Sent after the start pass, and after a later pass that took files.
    """

    count: int


@dataclass(frozen=True)
class Backlog:
    """Stable files waiting in incoming at the last poll (claimed ones are not there)."""

    files: int
    bytes: int


@dataclass(frozen=True)
class LeaseGone:
    """Another replica took over this replica's files: it must take no more work."""

    reason: str


@dataclass(frozen=True)
class ScanDone:
    """One poll finished."""

    seen: int
    stable: int
    seconds: float


@dataclass(frozen=True)
class SetupProblem:
    """The folders cannot work as configured (checked by the scanner at start).

    Empty ``problems`` means the checks passed (again). Until they do, no
    file is claimed: a claim across filesystems fails with EXDEV, and an
    unwritable staging fails every copy, so trying would only fill the log.
    """

    problems: tuple[str, ...]
    staging_bytes: int = 0  # the staging filesystem's whole size; 0 if unknown
    staging_holes: bool = True  # staging can punch holes, so a file can go through a window


@dataclass(frozen=True)
class ScanError:
    """A transient error while listing; the scanner backs off and retries."""

    error: str
    backoff_s: float


# any child -> parent


@dataclass(frozen=True)
class Beat:
    """I am alive, and this is what I am doing.

    Sent from the work loop itself (per scan, per copied chunk, per uploaded
    block), so a child whose work loop is stuck in a syscall stops beating
    and the supervisor notices.

    ``waiting`` says what the work loop is waiting on: ``"network"`` while it
    waits for block uploads or a request to storage (it wakes every second
    to beat: a network wait is bounded by the SDK's timeouts and is never a
    reason to kill). ``syscall_age`` is the age in seconds of the oldest file
    syscall in progress on a side thread (a block thread's read of the
    staging copy), 0 if none: a side thread blocked on a frozen disk does not
    stop the beats, so the beat carries how long it has been blocked.
    """

    state: ChildState
    file: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    waiting: str = ""
    syscall_age: float = 0.0


# uploader -> parent


@dataclass(frozen=True)
class Done:
    """The blob is committed and both copies are deleted."""

    job: Job
    size: int
    md5: str
    seconds: float
    upload_seconds: float


@dataclass(frozen=True)
class StorageOk:
    """A request to storage succeeded: the endpoint answers and accepts the credential.

    Sent once per job, after the first request that worked, so the parent
    can clear an outage before a large file's commit."""


@dataclass(frozen=True)
class StorageFailing:
    """A request to storage failed (``kind``: see ``storageerrors.outage_kind``).

    Sent the moment the work loop sees the failure, before it waits for the
    job's other block threads to give up too (each bounded by the SDK's
    timeouts), so status shows an outage as early as it is known."""

    kind: str
    error: str


@dataclass(frozen=True)
class Claimed:
    """The rename into ``.processing`` happened: from now on the file is this job's."""

    key: tuple[str, str, str]


@dataclass(frozen=True)
class Failed:
    """The attempt failed; the file stays where it is (claimed, or still in incoming).

    ``job`` is the job as the uploader left it: ``claimed`` once the rename
    happened, ``attempts``/``tries`` after this failure, ``uploaded`` once the
    blob is committed. ``counted`` is False when the failure says nothing
    about the file (the endpoint was unreachable, the credential was refused,
    staging was full): such attempts do not move a file towards ``.failed``,
    because an outage is not a poison file. ``outage`` names the kind of
    storage failure (``refused``, ``timeout``, ``5xx``, ``throttled``,
    ``unreachable``, ``auth``), empty when storage is not what failed.
    """

    job: Job
    error: str
    stage: Stage
    counted: bool
    outage: str = ""  # why storage failed, when it did (see storageerrors.outage_kind)

    @property
    def attempts(self) -> int:
        return self.job.attempts


@dataclass(frozen=True)
class GaveUp:
    """No more tries for this file in this run; it stays on NFS where ``path`` says.

    The bounded end of a step that keeps failing where quarantine cannot
    help: a claim that never succeeds (the file stays in incoming, and is
    offered again only once it changes), a cleanup or a move to ``.failed``
    that keeps failing (the file stays in ``.processing`` until a restart).
    """

    job: Job
    error: str
    stage: Stage
    path: str


@dataclass(frozen=True)
class Gone:
    """Not ours to upload: another replica took it, or it changed since found stable."""

    job: Job
    reason: str = ""


@dataclass(frozen=True)
class Quarantined:
    """The file failed too often and was moved to ``.failed``."""

    job: Job
    path: str
    error: str
