"""The messages that cross a child's pipe, in both directions.

They are small frozen dataclasses: each pickles to far less than PIPE_BUF, so
a write is atomic and a child killed mid-send cannot leave half a message.
The parent only ever learns about files through these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """Upload one file. ``name`` is the file name in incoming and in the blob.

    The uploader claims ``incoming/name`` into ``.processing/date/session/``.
    ``claimed`` says this instance already owns the copy there (recovered at
    start, retried, or its uploader died): the uploader then carries on from
    it. For a file just seen in incoming the rename is the lock, and losing
    it to another replica is a benign skip.
    """

    name: str
    date: str
    session: str  # the encoded session, a single folder name
    attempt: int = 1
    claimed: bool = False
    seen: tuple[int, int] | None = None  # (size, mtime_ns) when found stable

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
    """A file found in ``.processing`` at startup: claimed but not finished."""

    name: str
    date: str
    session: str
    size: int


@dataclass(frozen=True)
class RecoveryDone:
    """The listing of ``.processing`` is complete."""

    count: int


@dataclass(frozen=True)
class ScanDone:
    """One poll finished."""

    seen: int
    stable: int
    seconds: float


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
    block), never from a side thread, so a child stuck in a syscall stops
    beating and the supervisor notices.
    """

    state: str
    file: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0


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
class Failed:
    """The attempt failed; the file stays claimed in ``.processing``.

    ``counted`` is False when the failure says nothing about the file (the
    endpoint was unreachable, the credential was refused): such attempts do
    not move a file towards ``.failed``, because an outage is not a poison
    file. ``attempts`` is the file's count after this failure.
    """

    job: Job
    error: str
    stage: str
    counted: bool
    attempts: int


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
