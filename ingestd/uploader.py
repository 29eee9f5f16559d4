"""The uploader child: one file at a time, claim -> stage -> upload -> clean up.

:class:`Uploader` is the loop: it waits for a job from the parent, runs the
file steps of :mod:`ingestd.filesteps` (claim, stage, cleanup, quarantine)
around the upload, turns each failure into a :class:`~ingestd.filesteps.StepError`
(counted against the file or not), and reports how the job ended. What each
step leaves on disk after a crash, and how attempts are counted on NFS, is
said in :mod:`ingestd.filesteps`.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

from azure.core.exceptions import HttpResponseError
from azure.storage.blob import StandardBlobTier

from ingestd import blobupload, childruntime, leases, provenance, storageclient, storageerrors
from ingestd.blobupload import Staged
from ingestd.childruntime import Channel, ParentGone
from ingestd.config import Settings
from ingestd.filesteps import (
    BlockFailed,
    Changed,
    Paths,
    StagingWindow,
    StepError,
    Vanished,
    claim,
    cleanup,
    describe_os_error,
    discard_staged,
    file_size,
    kept_copy,
    prune_folders,
    quarantine,
    read_attempts,
    read_attempts_quietly,
    signature,
    stage,
    staging_capacity,
    unusable_name,
    write_attempts,
    write_record,
)
from ingestd.messages import (
    BOUNDED_STAGES,
    ChildState,
    Claimed,
    Done,
    Failed,
    GaveUp,
    Gone,
    Job,
    Quarantined,
    RateLimit,
    Signature,
    Stage,
    Stop,
    StorageFailing,
    StorageOk,
)
from ingestd.putblob import PutBlob
from ingestd.ratelimit import TokenBucket

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_PRUNE_S = 1.0
"""An uploader with no job for this long prunes the folders its finished files left empty."""


class Uploader:
    """The uploader's main loop: wait for a job, run it, report, repeat."""

    def __init__(
        self, settings: Settings, channel: Channel, auth_method: str, owner: str = ""
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.owner = owner  # this replica's lease token (ingestd.leases)
        self.auth_method = auth_method
        self.client = storageclient.container_client(settings, auth_method)
        self.put_blob = PutBlob(self.client, storageclient.NetworkBudget.of(settings))
        self.host = provenance.host_name()
        self.bucket = TokenBucket(initial_share(settings))
        channel.on(RateLimit, self._set_rate)
        # One pool for the life of the process: block threads are reused
        # from file to file instead of started and joined per file.
        self.pool = ThreadPoolExecutor(settings.azure_max_concurrency, thread_name_prefix="block")
        # Requests the work loop waits for (block list, commit, one-request
        # put) run here, so the work loop can beat while it waits.
        self.net = ThreadPoolExecutor(1, thread_name_prefix="net")
        self.windowed: StagingWindow | None = None  # the current file's window, if it has one
        # Finished jobs' folders to prune, one job's paths per (date, session).
        self.emptied: dict[tuple[str, str], Paths] = {}

    def _set_rate(self, message: RateLimit) -> None:
        """The parent sent this uploader's share of the cap: apply it now, mid-file too."""
        if message.bytes_per_s != self.bucket.rate:
            log.debug("upload rate share: %.0f bytes/s", message.bytes_per_s)
        self.bucket.set_rate(message.bytes_per_s)

    def run(self) -> None:
        while True:
            self.channel.beat(ChildState.IDLE)
            if not self.channel.poll(IDLE_PRUNE_S):
                self.prune_emptied()  # idle: no more files of those sessions for now
                continue
            message = self.channel.recv()
            if isinstance(message, Stop):
                self.prune_emptied()
                return
            if isinstance(message, Job):
                self.prune_emptied(keep=(message.date, message.session))
                self.channel.send(self.process(message))

    def prune_emptied(self, keep: tuple[str, str] | None = None) -> None:
        """Remove the folders the finished files left empty, except those of ``keep``.

        Pruned when the uploader has no work of that (date, session) left,
        not after every file: during a run of one session's files, each
        file would otherwise remove its session and date folders (in
        ``.processing`` and in staging) and the next file make them again,
        16 folder operations per file, each a round trip on NFS
        (bench/RESULTS.md: 0.4 ms of CPU per small file here).
        """
        roots = (self.settings.nfs_processing_root, self.settings.local_staging_root)
        for key in [key for key in self.emptied if key != keep]:
            prune_folders(self.emptied.pop(key), roots)

    def process(self, job: Job) -> Result:
        """Run every step of one job and say how it ended."""
        paths = Paths.of(self.settings, job)
        started = time.monotonic()
        self.windowed = None
        # Not forced: the parent marks the slot "claiming" when it sends the job.
        self.channel.beat(ChildState.CLAIMING, job.name)
        try:
            if not claim(paths, job, self.owner):
                discard_staged(paths)  # a killed uploader's copy, if one was left
                self._unlink_owner(paths)
                log.info(
                    "file gone or changed before claim (taken elsewhere, or being written again)",
                    extra=_context(job),
                )
                return Gone(job, "gone from incoming, or changed since it was found stable")
        except OSError as exc:
            return self._failed(job, paths, StepError(Stage.CLAIM, describe_os_error(exc), True))
        if not job.claimed:
            job = replace(job, claimed=True, maybe_claimed=False)
            self.channel.send(Claimed(job.key))
        try:
            return self._after_claim(job, paths, started)
        except StepError as exc:
            return self._failed(job, paths, exc)
        except Vanished:
            discard_staged(paths)
            self._unlink_owner(paths)
            log.info("claimed file vanished: another replica finished it", extra=_context(job))
            return Gone(job, "claimed file vanished (another replica finished it)")
        except (ParentGone, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug must cost one attempt, not the process
            log.exception("unexpected error", extra=_context(job))
            return self._failed(job, paths, StepError(Stage.INTERNAL, repr(exc), True))

    def _after_claim(self, job: Job, paths: Paths, started: float) -> Result:
        """Upload a claimed file (unless that is already done) and delete it."""
        job = replace(job, attempts=max(job.attempts, read_attempts_quietly(paths)))
        if job.attempts >= self.settings.max_attempts:
            return self._quarantine(job, paths, "attempts exhausted before restart")
        unusable = unusable_name(job.name)
        if unusable:
            return self._quarantine(job, paths, unusable)
        if job.uploaded is not None and signature(paths.claimed) == job.uploaded:
            size, md5, upload_seconds, staged_ino = job.uploaded[0], None, 0.0, None
            log.info("blob already committed; deleting the file only", extra=_context(job))
        else:
            staged, upload_seconds = self._transfer(paths, job)
            size, md5, staged_ino = staged.size, staged.md5, staged.staged_ino
            job = replace(job, uploaded=staged.source)
        self.channel.beat(ChildState.CLEANING, job.name, size, size, force=True)
        try:
            self._cleanup(job, paths, staged_ino)
        except StepError as exc:
            return self._failed(job, paths, exc)  # this job: it knows the blob is committed
        seconds = time.monotonic() - started
        mb_per_s = size / 1e6 / upload_seconds if upload_seconds > 0 else 0.0
        log.info(
            "uploaded %s (%d bytes) in %.2f s",
            job.blob_name,
            size,
            seconds,
            extra={
                **_context(job),
                "size": size,
                "seconds": round(seconds, 3),
                "mb_per_s": round(mb_per_s, 1),
            },
        )
        return Done(job, size, md5.hex() if md5 else "", seconds, upload_seconds)

    def _transfer(self, paths: Paths, job: Job) -> tuple[Staged, float]:
        """Stage the file and upload it, the two overlapped; or resume an upload.

        Each block is uploaded (from the staging file) as soon as the copy
        has written it, so the network is busy from the first block on and
        a file's copy costs no extra wall time. The blob is committed only
        once the whole file is staged and fsynced and every block is in.

        A file sent in blocks first asks storage which of its blocks it
        already holds (an earlier attempt's, even one from before a crash)
        and sends only the others. When an earlier attempt left a complete
        staging copy of this very version (:func:`kept_copy`), NFS is not
        read at all. Returns what was staged and the seconds from first
        block to commit.
        """
        copied = False
        size_hint = [0]

        def progress(current: int, total: int | None) -> None:
            if copied:  # while copying, the copy's progress is what operators need
                self.channel.beat(ChildState.UPLOADING, job.name, current, total or size_hint[0])

        settings = self.settings
        block_size = settings.azure_max_block_size
        upload = blobupload.BlockUpload(
            self.client,
            settings,
            job.blob_name,
            str(paths.staged),
            self.pool,
            progress,
            self.bucket,
            self._network_beat,
            self._over_network,
            self.channel.file_calls,
            self.net.submit,
            lambda: self.channel.send(StorageOk()),
        )
        try:
            kept = kept_copy(paths, block_size, settings.azure_put_md5)
            size = file_size(paths.claimed)
            if kept is not None or size > settings.azure_max_single_put_size:
                upload.list_existing()
            window = self._window(job, size, upload) if kept is None else None
            if kept is not None:
                copied, size_hint[0], staged = True, kept.size, kept
                self.channel.beat(ChildState.UPLOADING, job.name, 0, kept.size, force=True)
                self._storage_call(lambda: self._add_blocks(upload, kept, block_size))
            else:
                paths.staged_record.unlink(missing_ok=True)  # it would describe the old copy
                staged = self._stage(paths, job, upload.add, window)
                if staged.block_md5s and window is None:  # a windowed copy has holes
                    write_record(paths, staged, block_size)
            copied, size_hint[0] = True, staged.size
            self.channel.beat(
                ChildState.UPLOADING, job.name, upload.uploaded, staged.size, force=True
            )
            started = upload.started or time.monotonic()
            metadata = provenance.blob_metadata(
                job, staged.size, staged.mtime_ns, staged.md5, self.host
            )
            self._blocks_sent(upload, staged)
            if staged.data is not None:
                self._put_whole(job, paths, staged, upload.tier, metadata)
            else:
                version = self._look_at_blob(job)
                self._still_the_version_read(paths, staged.source)
                self._commit_unless_changed(
                    lambda: upload.commit(staged.size, staged.md5, metadata, version)
                )
            if window is not None:
                log.info(
                    "%s: staged through a window of %d bytes, at most %d held at once",
                    job.blob_name,
                    window.size,
                    window.peak,
                    extra=_context(job),
                )
            if upload.skipped or kept is not None:
                log.info(
                    "%s resumed: %d of %d bytes were already in storage%s",
                    job.blob_name,
                    upload.skipped,
                    staged.size,
                    "; uploaded from the staging copy (NFS not read again)"
                    if kept is not None
                    else "",
                    extra=_context(job),
                )
            return staged, time.monotonic() - started
        finally:
            upload.close()

    def _window(self, job: Job, size: int, upload: blobupload.BlockUpload) -> StagingWindow | None:
        """The window to copy this file through, if the parent gave it one (``job.window``).

        A file that goes in one request, or is no larger than the window
        after all (it shrank since the scan), is staged whole.
        """
        if job.window <= 0 or size <= max(job.window, self.settings.azure_max_single_put_size):
            self.windowed = None
            return None
        log.info(
            "%s (%d bytes) is staged through a window of %d bytes",
            job.blob_name,
            size,
            job.window,
            extra=_context(job),
        )
        self.windowed = StagingWindow(job.window, upload)
        return self.windowed

    def _blocks_sent(self, upload: blobupload.BlockUpload, staged: Staged) -> None:
        """Wait (beating) until every block is in storage, before the last check and commit."""
        if staged.data is None:
            self._storage_call(lambda: upload.wait_for_blocks(staged.size))

    def _put_whole(
        self,
        job: Job,
        paths: Paths,
        staged: Staged,
        tier: StandardBlobTier | None,
        metadata: dict[str, str],
    ) -> None:
        """Send a small file in one Put Blob, never over a blob that changed since it was seen.

        The first put is conditional on there being no blob of that name
        (``If-None-Match: *``): that is the look at the blob and the commit
        in one request, so a new name, the common case, costs one request
        instead of two (see bench/RESULTS.md). When the name is taken, the
        blob is looked at and the put is made conditional on what was seen,
        as for a file sent in blocks.
        """

        def put(version: blobupload.Version) -> None:
            def paced_put() -> None:
                # The rate cap counts every byte sent, as a block's reads do;
                # meanwhile the work loop beats, waiting on the "network".
                self.bucket.take(staged.size)
                blobupload.put_whole(
                    self.put_blob, job.blob_name, str(paths.staged), staged, tier, metadata, version
                )

            self._over_network(paced_put)

        def put_if_new() -> bool:
            try:
                put(blobupload.NO_BLOB)
            except HttpResponseError as exc:
                if blobupload.condition_failed(exc):
                    return False
                raise
            return True

        self._still_the_version_read(paths, staged.source)
        if self._storage_call(put_if_new):
            return
        version = self._look_at_blob(job)
        self._still_the_version_read(paths, staged.source)
        self._commit_unless_changed(lambda: put(version))

    def _look_at_blob(self, job: Job) -> blobupload.Version:
        """The blob's ETag now (or that there is none), for a commit conditional on it."""
        return self._storage_call(
            lambda: self._over_network(lambda: blobupload.blob_version(self.client, job.blob_name))
        )

    def _commit_unless_changed(self, commit: Callable[[], None]) -> None:
        """Run a conditional commit; another upload's commit since the look is a retry."""
        try:
            self._storage_call(commit)
        except StepError as exc:
            cause = exc.__cause__
            if cause is not None and blobupload.condition_failed(cause):
                raise StepError(
                    Stage.UPLOAD,
                    "another upload of this file committed the blob "
                    "since it was checked: not committed over it; tried "
                    "again",
                    False,
                ) from cause
            raise

    @staticmethod
    def _still_the_version_read(paths: Paths, source: Signature) -> None:
        """Commit only the version of the file that is still on NFS.

        An older read must never be committed over a newer one. With two
        replicas on one share, a replica whose recovery took a file the other
        was still uploading may have read it before a writer appended to it;
        if the other replica commits the newer version and deletes the file
        first, a commit of the older read would then replace the blob, and
        the only copy of the appended bytes would be gone. So: a file that
        changed is not committed (it is uploaded again), and a file that
        vanished was finished by another replica. Cleanup checks once more
        after the commit (see :func:`cleanup`).
        """
        try:
            now = signature(paths.claimed)
        except OSError as exc:
            raise StepError(
                Stage.COPY, f"copy failed (nfs): {describe_os_error(exc)}", True
            ) from exc
        if now is None:
            raise Vanished()
        if now != source:
            raise StepError(
                Stage.VERIFY,
                f"it changed while it was uploaded (size, mtime, inode "
                f"{source} -> {now}): not committed, to be uploaded again",
                True,
            )

    @staticmethod
    def _add_blocks(upload: blobupload.BlockUpload, staged: Staged, block_size: int) -> None:
        """Queue every block of a kept staging copy, as the copy would have."""
        for index, md5 in enumerate(staged.block_md5s):
            offset = index * block_size
            upload.add(offset, min(block_size, staged.size - offset), md5)

    def _storage_call(self, call: Callable[[], T]) -> T:
        """Run a step that talks to storage; its failure is an upload error."""
        try:
            return call()
        except (ParentGone, KeyboardInterrupt, StepError, Vanished):
            raise
        except OSError as exc:  # reading the staging copy for a block
            raise StepError(
                Stage.UPLOAD, f"upload failed (staging): {describe_os_error(exc)}", True
            ) from exc
        except Exception as exc:
            raise self._upload_error(exc) from exc

    def _over_network(self, call: Callable[[], T]) -> T:
        """Run a request on the network thread; beat (waiting on "network") until it returns.

        The request is bounded by the SDK's timeouts and retries
        (:class:`ingestd.storageclient.NetworkBudget`); however long it takes, the
        uploader is alive, so it must not stop beating and be killed as stalled.
        """
        future = self.net.submit(call)
        while True:
            done, _ = wait([future], timeout=blobupload.WAKE_S)
            if done:
                return future.result()
            self._network_beat()

    def _network_beat(self) -> None:
        with self.channel.waiting("network"):
            self.channel.renew()

    def _stage(
        self,
        paths: Paths,
        job: Job,
        on_block: Callable[[int, int, bytes], None] | None,
        window: StagingWindow | None = None,
    ) -> Staged:
        try:
            return stage(
                paths,
                self.channel,
                job.name,
                self.settings.azure_max_block_size,
                self.settings.azure_max_single_put_size,
                on_block,
                self.settings.azure_put_md5,
                window,
            )
        except BlockFailed as exc:
            cause = exc.__cause__ or exc
            raise self._upload_error(cause) from cause
        except FileNotFoundError as exc:
            if not os.path.lexists(paths.claimed):
                raise Vanished() from exc
            raise StepError(Stage.COPY, f"copy failed: {describe_os_error(exc)}", True) from exc
        except OSError as exc:
            if exc.filename and str(exc.filename).startswith(str(self.settings.local_staging_root)):
                raise self._staging_failure(exc, paths) from exc
            raise StepError(
                Stage.COPY, f"copy failed (nfs): {describe_os_error(exc)}", True
            ) from exc

    @staticmethod
    def _staging_failure(exc: OSError, paths: Paths) -> StepError:
        """A full staging disk counts against a file only if the file can never fit.

        Staging is usually full because of the other uploads in flight (or
        something an operator left there): that says nothing about this file,
        so it is retried with the outage backoff and never quarantined. A file
        larger than the whole staging filesystem would fail forever, so those
        failures count and the file ends in ``.failed`` with the sizes said.
        """
        message = f"copy failed (staging): {describe_os_error(exc)}"
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return StepError(Stage.COPY, message, True)
        size, capacity = file_size(paths.claimed), staging_capacity(paths.staged.parent)
        if size > capacity:
            return StepError(
                Stage.COPY,
                f"{message}: the file ({size} bytes) is larger than "
                f"the whole staging filesystem ({capacity} bytes)",
                True,
            )
        return StepError(
            Stage.COPY,
            f"{message}: staging is full ({size} bytes needed, "
            f"{capacity} in all); retried, not counted against the file",
            False,
        )

    def _upload_error(self, exc: BaseException) -> StepError:
        """The step error for a failed upload; tells the parent at once if storage failed."""
        kind = storageerrors.outage_kind(exc)
        method = self.auth_method if kind == "auth" else None
        message = f"upload failed: {storageerrors.describe_error(exc, method)}"
        if kind:
            self.channel.send(StorageFailing(kind, message))
        return StepError(Stage.UPLOAD, message, not kind, kind)

    def _cleanup(self, job: Job, paths: Paths, staged_ino: int | None) -> None:
        assert job.uploaded is not None
        try:
            cleanup(paths, job.uploaded, staged_ino, self.owner)
            self.emptied[(job.date, job.session)] = paths
        except Changed as exc:
            raise StepError(Stage.VERIFY, str(exc), True) from exc
        except FileNotFoundError as exc:
            if not os.path.lexists(paths.claimed):
                raise Vanished() from exc
            raise StepError(
                Stage.CLEANUP, f"cleanup failed: {describe_os_error(exc)}", False
            ) from exc
        except OSError as exc:
            # The blob is committed; the file stays claimed and the retry
            # only deletes it (job.uploaded), a bounded number of times.
            raise StepError(
                Stage.CLEANUP, f"cleanup failed: {describe_os_error(exc)}", False
            ) from exc

    def _unlink_owner(self, paths: Paths) -> None:
        """Drop our owner link if the claim did not happen, so other replicas may take the file.

        Best effort: a link left behind only keeps other replicas off that
        name until this replica's heir (or its next start) removes it.
        """
        try:
            leases.release_if_unclaimed(paths.owner, paths.claimed, self.owner)
        except OSError as exc:
            log.warning(
                "could not remove the owner link %s: %s", paths.owner, describe_os_error(exc)
            )

    def _failed(self, job: Job, paths: Paths, exc: StepError) -> Failed | Quarantined | GaveUp:
        """Count the failure, then quarantine, give up, or ask for a retry.

        The staging copy is kept after a storage outage (the retry uploads
        from it, see :func:`kept_copy`), unless it was copied through a
        window (its released blocks are holes, and the parent lends its
        space to other files meanwhile); after any other failure a retry
        copies again, or only deletes (``job.uploaded``).
        """
        if not exc.outage or self.windowed is not None:  # a windowed copy has holes
            discard_staged(paths)
        if not job.claimed:
            self._unlink_owner(paths)  # a failed claim: the file is still in incoming
        note = ""
        if exc.counted:
            attempts, note = self._count(job, paths, exc)
            job = replace(job, attempts=attempts)
            if attempts >= self.settings.max_attempts:
                if job.claimed:
                    return self._quarantine(job, paths, str(exc))
                return self._give_up(job, exc, paths.incoming)
        elif exc.stage in BOUNDED_STAGES:
            job = replace(job, tries=job.tries + 1)
            if job.tries >= self.settings.max_attempts:
                return self._give_up(job, exc, paths.claimed)
        log.error(
            "%s failed at %s (attempt %d of %d)%s",
            job.blob_name,
            exc.stage,
            job.attempts,
            self.settings.max_attempts,
            note,
            extra={**_context(job), "error": str(exc)},
        )
        return Failed(job, str(exc), exc.stage, exc.counted, exc.outage)

    def _count(self, job: Job, paths: Paths, exc: StepError) -> tuple[int, str]:
        """The file's attempts after this failure, and a note if NFS could not record it.

        The count kept in memory (``job.attempts``) is the floor, so a record
        on NFS that cannot be read or written cannot make a file immortal.
        A file still in incoming has no record on NFS: its count lives in memory.
        """
        if not job.claimed:
            return job.attempts + 1, ""
        try:
            attempts = max(job.attempts, read_attempts(paths)) + 1
        except OSError:
            attempts = job.attempts + 1
        try:
            write_attempts(paths, attempts, str(exc))
        except OSError as write_error:
            return attempts, f" (attempt not recorded on NFS: {describe_os_error(write_error)})"
        return attempts, ""

    def _give_up(self, job: Job, exc: StepError, where: Path) -> GaveUp:
        log.error(
            "%s: giving up after %d failed %s attempts; the file stays at %s: %s",
            job.blob_name,
            self.settings.max_attempts,
            exc.stage,
            where,
            exc,
            extra={**_context(job), "error": str(exc)},
        )
        return GaveUp(job, str(exc), exc.stage, str(where))

    def _quarantine(self, job: Job, paths: Paths, error: str) -> Quarantined | Failed | GaveUp:
        try:
            target = quarantine(paths, job, job.attempts, error, self.owner)
        except OSError as exc:
            message = f"cannot move to .failed: {describe_os_error(exc)} (after: {error})"
            return self._failed(job, paths, StepError(Stage.QUARANTINE, message, False))
        self.emptied[(job.date, job.session)] = paths
        log.error(
            "%s moved to %s after %d failed attempts",
            job.blob_name,
            target,
            job.attempts,
            extra={**_context(job), "error": error},
        )
        return Quarantined(job, str(target), error)


Result = Done | Failed | Gone | Quarantined | GaveUp


def _context(job: Job) -> dict[str, str]:
    return {"file": job.name, "session": job.session, "date": job.date}


def initial_share(settings: Settings) -> float:
    """Bytes/s until the parent sends this uploader its share: never more than it could be.

    The parent's share comes at the next tick; until then an equal split of
    the configured cap keeps a fresh uploader from overshooting.
    """
    return settings.azure_max_mbps * 1e6 / settings.worker_concurrency


UPLOADER_NICE = 10
"""Uploads are batch work that can use every core (hashing); the parent's API,
its probes and the scanner must not queue behind them when the pod's CPU
limit is reached. On a loaded machine this lowers /v1/status p99; on a quiet
one it changes nothing (the uploaders still get all the CPU nothing else
wants). Figures: bench/RESULTS.md."""


def _lower_priority() -> None:
    try:
        os.nice(UPLOADER_NICE)
    except OSError:
        pass  # not allowed here: run at normal priority


def main(
    conn: Connection, settings: Settings, auth_method: str, role: str, owner: str = ""
) -> None:
    """Entry point of an uploader process; ``owner`` is this replica's lease token."""
    childruntime.start(settings, role)
    _lower_priority()
    channel = Channel(conn)
    try:
        Uploader(settings, channel, auth_method, owner).run()
    except ParentGone:
        return
