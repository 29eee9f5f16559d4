"""The scanner child: the only process that lists NFS folders.

It polls incoming, decides which files are stable (and reports the backlog),
and at its start lists ``.processing`` so claimed-but-unfinished files are
uploaded again. It also renews this replica's lease on the share and, at
each renewal, takes over the claims of replicas whose lease expired
(:mod:`ingestd.leases`). It keeps no state but the previous poll's
``(size, mtime, inode)`` per name and what it saw of other leases;
everything it learns goes to the parent as messages.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

from ingestd import childruntime, leases, punchhole
from ingestd.childruntime import Channel, ParentGone
from ingestd.config import Settings
from ingestd.leases import Lease, LeaseLost, Observer, Recovery
from ingestd.messages import (
    Backlog,
    ChildState,
    LeaseGone,
    Recovered,
    RecoveryDone,
    ReleaseLease,
    ScanControl,
    ScanDone,
    ScanError,
    SetupProblem,
    Stable,
    Stop,
)

log = logging.getLogger(__name__)

DATE_FOLDER = re.compile(r"^\d{8}$")
MAX_BACKOFF_S = 60.0
BATCH = 500
"""Stable files per message: one pickle per file would cost the parent more
than the scan itself when thousands of files wait."""
REOFFER_POLLS = 8
"""A stable file already offered and still waiting in incoming (queued, or
dropped because the parent's queue was full) is offered again once every
this many polls, an eighth of them at each poll. Offering every waiting file
at every poll cost the parent as much as the scan itself, under its lock;
this way a poll's messages stay small however many files wait, and a
dropped file comes back soon. Figures: bench/RESULTS.md."""
BEAT_EVERY = 256
"""Entries between heartbeats while listing: a stat stuck on a hung mount
still stops the beats, without a clock read per entry."""

Signature = tuple[int, int, int]  # size, mtime_ns, inode
T = TypeVar("T")


@dataclass
class Listing:
    """One poll of incoming: candidate files and what they looked like."""

    files: dict[str, Signature]
    seconds: float


def list_incoming(
    incoming: Path, channel: Channel, known: Callable[[str], Signature | None] | None = None
) -> Listing:
    """Regular files directly in ``incoming``; dotfiles, folders and symlinks are skipped.

    ``scandir`` gives the file type without a syscall per entry; one
    ``lstat`` per candidate is the whole cost of a poll. ``known(name)``
    may give a signature to take as is instead of an ``lstat`` (see
    :meth:`Scanner._poll`).
    """
    started = time.monotonic()
    files: dict[str, Signature] = {}
    with os.scandir(incoming) as entries:
        for count, entry in enumerate(entries):
            if count % BEAT_EVERY == 0:
                channel.beat(ChildState.SCANNING)
            if entry.name.startswith("."):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            if known is not None:
                signature = known(entry.name)
                if signature is not None:
                    files[entry.name] = signature
                    continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # taken by an uploader or another replica meanwhile
            files[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return Listing(files=files, seconds=time.monotonic() - started)


def stable_files(
    previous: dict[str, Signature], current: dict[str, Signature], now_ns: int, min_age_s: float
) -> list[tuple[str, int, int]]:
    """Files unchanged since the previous poll and older than ``min_age_s``."""
    min_age_ns = int(min_age_s * 1e9)
    return [
        (name, sig[0], sig[1])
        for name, sig in current.items()
        if previous.get(name) == sig and now_ns - sig[1] >= min_age_ns
    ]


def choose_offers(
    stable: list[tuple[str, int, int]],
    current: dict[str, Signature],
    offered: dict[str, Signature],
    poll: int,
    every: int = REOFFER_POLLS,
) -> tuple[list[tuple[str, int, int]], dict[str, Signature]]:
    """Which stable files to offer the parent at this poll, and the new ``offered``.

    A file is offered as soon as it is stable (or stable again after a
    change); after that, while it waits unchanged in incoming, once every
    ``every`` polls (spread by name, so each poll carries about 1/``every``
    of the waiting files).
    """
    offers = []
    now_offered: dict[str, Signature] = {}
    for item in stable:
        name = item[0]
        signature = current[name]
        if offered.get(name) != signature or (hash(name) + poll) % every == 0:
            offers.append(item)
        now_offered[name] = signature
    return offers, now_offered


def recover(recovery: Recovery, channel: Channel, start: bool) -> int:
    """Report the claimed files that are this replica's to upload; return the count.

    At a scanner start: every file this replica holds, those of its earlier
    lives, those without an owner, and those of replicas taken for dead.
    Afterwards, every :func:`leases.renew_interval`: only what it takes over
    (see :class:`ingestd.leases.Recovery`).
    """
    result = recovery.run(start, lambda: channel.beat(ChildState.RECOVERING))
    for claim in result.ours:
        channel.send(
            Recovered(name=claim.name, date=claim.date, session=claim.session, size=claim.size)
        )
    for holder, count in result.adopted.items():
        log.warning(
            "took over %d claimed files of %s, taken for dead (no lease "
            "renewal seen for %.0f s, or an earlier life of this replica)",
            count,
            holder,
            recovery.observer.silent_for(holder),
        )
    if result.ownerless:
        log.info(
            "took %d claimed files that had no owner (claimed before leases, or "
            "moved back by hand)",
            result.ownerless,
        )
    return len(result.ours)


def check_setup(settings: Settings) -> list[str]:
    """What makes the configured folders unusable; empty when all is well.

    Incoming, ``.processing`` and ``.failed`` must be one filesystem: a
    claim is a rename, and a rename across filesystems fails (EXDEV) on
    every file. Staging must take a new file. Each is checked once at start
    (and again until it passes), so a misconfiguration reads as one clear
    error instead of a failed claim per file. An NFS error raises (the
    caller backs off and retries, as for a scan).
    """
    folders = {
        "APP_NFS_INCOMING_DIR": settings.nfs_incoming_dir,
        "APP_NFS_PROCESSING_ROOT": settings.nfs_processing_root,
        "APP_NFS_FAILED_ROOT": settings.nfs_failed_root,
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    (settings.nfs_processing_root / leases.LEASES).mkdir(exist_ok=True)
    devices = {name: os.stat(folder).st_dev for name, folder in folders.items()}
    problems = []
    if len(set(devices.values())) > 1:
        where = ", ".join(
            f"{name}={folders[name]} (device {os.major(dev)}:{os.minor(dev)})"
            for name, dev in devices.items()
        )
        problems.append(
            "incoming, .processing and .failed must be on one filesystem, "
            f"since a claim is a rename; they are not: {where}"
        )
    problem = _staging_problem(settings.local_staging_root)
    if problem:
        problems.append(problem)
    return problems


def _staging_problem(root: Path) -> str | None:
    """Can a file be created, synced and removed in staging? (No data: a full disk is fine.)"""
    probe = root / f".ingestd-probe-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        return f"APP_LOCAL_STAGING_ROOT={root} is not writable: {_describe(exc)}"
    return None


def staging_size(root: Path) -> int:
    """The staging filesystem's whole size in bytes (the parent's staging budget), 0 if unknown.

    Measured here because the parent makes no file syscall: it learns the
    size from the setup check's message.
    """
    try:
        st = os.statvfs(root)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize


RECORDS_FOLDER = ".blocks"
"""Where uploaders record what each complete staging copy holds (see uploader)."""


def clean_staging(staging_root: Path) -> int:
    """Delete leftover staging copies from a previous run of this instance.

    Staging is this pod's own disk and nothing is in flight before the first
    recovery completes, so every file found is stale. Only files at the depth
    the uploaders write (``<date>/<session>/<name>``) are touched, so a
    misconfigured root cannot lead to deleting anything else.
    """
    removed = 0
    for date in _folders(staging_root):
        if not DATE_FOLDER.match(date):
            continue
        for session in _folders(staging_root / date):
            folder = staging_root / date / session
            for path in [*folder.iterdir(), *_files_in(folder / RECORDS_FOLDER)]:
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed += 1
    return removed


def _files_in(folder: Path) -> list[Path]:
    """The records of staging copies (``.blocks``): stale with their copies."""
    return list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def _folders(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


class Scanner:
    """The scanner's main loop, with its backoff and its one piece of state."""

    def __init__(self, settings: Settings, channel: Channel, owner: str) -> None:
        self.settings = settings
        self.channel = channel
        self.enabled = False
        self.previous: dict[str, Signature] = {}
        self.offered: dict[str, Signature] = {}
        self.polls = 0
        self.backoff_s = 0.0
        root = settings.nfs_processing_root
        self.lease = Lease(root, owner)
        self.recovery = Recovery(root, owner, Observer(owner, settings.lease_timeout_s))
        self.renew_s = leases.renew_interval(settings.lease_timeout_s)
        self.next_renewal = 0.0
        self.lease_lost = False

    def run(self, first_start: bool) -> None:
        self._check_setup()
        # The lease first: no file may be claimed under a token without one.
        self._retrying("lease renewal", self._renew)
        self._retrying("recovery", lambda: self._recover(first_start))
        next_poll = 0.0
        while True:
            wake = next_poll if self.enabled else math.inf
            if not self.lease_lost:
                wake = min(wake, self.next_renewal)
            self._wait_for_control(max(0.0, wake - time.monotonic()))
            if not self.lease_lost and time.monotonic() >= self.next_renewal:
                self._retrying("lease renewal", self._renew)
                self._retrying("recovery", self._adopt)
            if not self.enabled:
                next_poll = 0.0  # poll at once when enabled again
            elif time.monotonic() >= next_poll:
                self._retrying("scan", self._poll)
                next_poll = time.monotonic() + self.settings.poll_interval_s

    def _check_setup(self) -> None:
        """Hold recovery (and so every claim) until the folders are usable.

        The problem is logged once and reported to the parent, which shows it
        in /v1/status and fails /healthz with it; the check is repeated, with
        backoff, so a fixed mount is picked up without a restart.
        """
        reported: list[str] = []
        wait_s = self.settings.poll_interval_s
        staging = self.settings.local_staging_root
        while True:
            self.channel.beat(ChildState.CHECKING, force=True)
            problems = self._retrying("folder check", lambda: check_setup(self.settings))
            holes = not problems and self._staging_holes(staging)
            self.channel.send(SetupProblem(tuple(problems), staging_size(staging), holes))
            if not problems:
                return
            if problems != reported:
                log.error("cannot take files: %s", "; ".join(problems))
                reported = problems
            self._sleep(wait_s)
            wait_s = min(MAX_BACKOFF_S, wait_s * 2)

    def _staging_holes(self, staging: Path) -> bool:
        """Can staging give space back mid-file? Without it no file goes through a window."""
        if punchhole.supported(staging):
            return True
        log.warning(
            "APP_LOCAL_STAGING_ROOT=%s cannot punch holes (fallocate PUNCH_HOLE is not "
            "supported): every file is staged whole, so a file larger than the staging "
            "budget waits until it runs alone and then needs its whole size free",
            staging,
        )
        return False

    def _recover(self, first_start: bool) -> None:
        self.channel.beat(ChildState.RECOVERING, force=True)
        if first_start:
            removed = clean_staging(self.settings.local_staging_root)
            if removed:
                log.info("removed %d stale staging files", removed)
        count = recover(self.recovery, self.channel, start=True)
        self.channel.send(RecoveryDone(count=count))

    def _renew(self) -> None:
        """Renew the lease; if another replica took our files, say so and stop renewing."""
        self.next_renewal = time.monotonic() + self.renew_s
        try:
            self.lease.renew()
        except LeaseLost as exc:
            log.error("lease lost: %s; this replica takes no more work", exc)
            self.lease_lost = True
            self.channel.send(LeaseGone(str(exc)))

    def _adopt(self) -> None:
        """The periodic pass: take the files of replicas taken for dead."""
        if self.lease_lost:
            return
        self.channel.beat(ChildState.RECOVERING, force=True)
        count = recover(self.recovery, self.channel, start=False)
        if count:
            self.channel.send(RecoveryDone(count=count))
        self.channel.beat(ChildState.IDLE, force=True)

    def _poll(self) -> None:
        self.channel.beat(ChildState.SCANNING, force=True)
        listing = list_incoming(self.settings.nfs_incoming_dir, self.channel, self._unchecked)
        stable = stable_files(
            self.previous, listing.files, time.time_ns(), self.settings.min_file_age_s
        )
        self.previous = listing.files
        self.polls += 1
        offers, self.offered = choose_offers(stable, listing.files, self.offered, self.polls)
        for start in range(0, len(offers), BATCH):
            self.channel.send(Stable(files=tuple(offers[start : start + BATCH])))
        self.channel.send(
            ScanDone(seen=len(listing.files), stable=len(stable), seconds=listing.seconds)
        )
        self.channel.send(Backlog(files=len(stable), bytes=sum(item[1] for item in stable)))
        self.channel.beat(ChildState.IDLE, force=True)

    def _unchecked(self, name: str) -> Signature | None:
        """The signature to reuse without an ``lstat`` for a file already offered, or None.

        A file offered and still waiting in incoming is offered again only
        once every ``REOFFER_POLLS`` polls, so only at those polls does it
        need looking at: between them its last signature stands. A change
        in between is caught by the uploader, which claims only the
        ``(size, mtime)`` that was offered, and by the next lstat, after
        which the file must be stable again before it is offered. With
        thousands of files waiting this takes most of a poll's lstats away.
        Figures: bench/RESULTS.md.
        """
        signature = self.offered.get(name)
        if signature is None or (hash(name) + self.polls + 1) % REOFFER_POLLS == 0:
            return None
        return signature

    def _retrying(self, what: str, step: Callable[[], T]) -> T:
        """Run ``step`` until it succeeds, backing off on NFS errors; return its result.

        A stale handle or an I/O error on NFS is usually transient; the
        scanner waits (doubling, capped) and tries again, beating meanwhile.
        """
        while True:
            try:
                result = step()
                self.backoff_s = 0.0
                return result
            except OSError as exc:
                self.backoff_s = min(
                    MAX_BACKOFF_S, max(self.settings.poll_interval_s, self.backoff_s * 2)
                )
                reason = f"{what} failed: {_describe(exc)}"
                log.warning(
                    "%s; retrying in %.1f s",
                    reason,
                    self.backoff_s,
                    extra={"file": getattr(exc, "filename", None)},
                )
                self.channel.send(ScanError(error=reason, backoff_s=self.backoff_s))
                self._sleep(self.backoff_s)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._wait_for_control(left)

    def _wait_for_control(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a message from the parent, beating at least each second."""
        self.channel.beat(ChildState.IDLE if not self.backoff_s else ChildState.BACKOFF)
        if not self.channel.poll(min(timeout, 1.0)):
            return
        message = self.channel.recv()
        if isinstance(message, Stop):
            raise ParentGone()
        if isinstance(message, ScanControl):
            self.enabled = message.enabled
            if not self.enabled:
                self.previous = {}
                self.offered = {}
        if isinstance(message, ReleaseLease) and not self.lease_lost:
            try:
                self.lease.release()
                self.lease_lost = True  # nothing more to renew: we are stopping
                log.info("lease released: other replicas may take what is left at once")
            except OSError as exc:
                log.warning(
                    "could not release the lease (%s); others take what is left once it expires",
                    _describe(exc),
                )


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{name}: {exc.strerror or exc}{where}"


def main(conn: Connection, settings: Settings, first_start: bool, owner: str) -> None:
    """Entry point of the scanner process; ``owner`` is this replica's lease token."""
    childruntime.start(settings, "scanner")
    try:
        Scanner(settings, Channel(conn), owner).run(first_start)
    except ParentGone:
        return
