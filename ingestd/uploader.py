"""The uploader child: one file at a time, claim -> stage -> upload -> clean up.

Every step leaves the disk in a state that says what to do after a crash:

* claimed: the file sits in ``.processing/<date>/<session>/``; recovery finds it.
* staged: a local copy, fsynced, whose MD5 was computed in the same pass.
* uploaded: the blob is committed (overwrite, so a retry is harmless).
* cleaned: the NFS copy is deleted only now, then the staging copy.

A file that fails ``APP_MAX_ATTEMPTS`` times for reasons of its own (not an
outage) is moved to ``.failed/<date>/<session>/`` with a sidecar saying why.
Attempts are counted on NFS, next to the claimed file, so they survive restarts.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from ingestd import blobstore, child, provenance
from ingestd.blobstore import Staged
from ingestd.child import Channel, ParentGone
from ingestd.config import Settings
from ingestd.messages import Done, Failed, Gone, Job, Quarantined, RateLimit, Stop
from ingestd.ratelimit import TokenBucket

log = logging.getLogger(__name__)

COPY_CHUNK = 256 * 1024
"""Bytes per read from NFS while staging. Measured: the same CPU per GiB as
1 MiB (hashing dominates; the NFS client reads ahead anyway), and 0.75 MiB
less resident per uploader."""
ATTEMPTS_FOLDER = ".attempts"
ERRORS_FOLDER = ".errors"


class StepError(Exception):
    """A step failed; carries the stage and whether it counts against the file."""

    def __init__(self, stage: str, message: str, counted: bool) -> None:
        super().__init__(message)
        self.stage = stage
        self.counted = counted


class Vanished(Exception):
    """The claimed file disappeared: another replica uploaded and deleted it."""


@dataclass(frozen=True)
class Paths:
    """Where one job's file lives at each step."""

    incoming: Path
    claimed: Path
    staged: Path
    attempts: Path
    failed: Path
    failed_sidecar: Path

    @classmethod
    def of(cls, settings: Settings, job: Job) -> Paths:
        processing = settings.nfs_processing_root / job.date / job.session
        failed = settings.nfs_failed_root / job.date / job.session
        return cls(
            incoming=settings.nfs_incoming_dir / job.name,
            claimed=processing / job.name,
            staged=settings.local_staging_root / job.date / job.session / job.name,
            attempts=processing / ATTEMPTS_FOLDER / job.name,
            failed=failed / job.name,
            failed_sidecar=failed / ERRORS_FOLDER / job.name,
        )


# The steps. Each is a plain function of paths, so tests can call them directly.


def claim(paths: Paths, ours: bool, seen: tuple[int, int] | None = None) -> bool:
    """Move the file into ``.processing``; False if another replica took it (a benign race).

    The rename is the lock (PRD FR-3): for a file seen in incoming, finding it
    gone means another replica won the rename, and the file is skipped rather
    than uploaded twice. A file this instance already claimed (``ours``:
    recovered, retried, its uploader killed) is continued from ``.processing``.
    A claimed copy is never overwritten by a newer file of that name: that one
    waits in incoming until the older copy is done.

    ``seen`` is the (size, mtime) the scanner found stable. A file may wait in
    the queue for a long time; if a writer has started on it again since, it
    is not taken half-written but skipped, and offered again once stable.
    """
    if os.path.lexists(paths.claimed):
        return ours or os.path.lexists(paths.incoming)
    if not ours and seen is not None and _signature(paths.incoming) != seen:
        return False
    paths.claimed.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(paths.incoming, paths.claimed)
    except FileNotFoundError:
        return ours and os.path.lexists(paths.claimed)
    return True


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


class BlockFailed(Exception):
    """A block upload failed while the file was still being staged."""


def stage(paths: Paths, channel: Channel, file: str, block_size: int, single_put_size: int,
          on_block: Callable[[int, int, bytes], None] | None = None,
          whole_md5: bool = True) -> Staged:
    """Copy the claimed file to staging, hashing it in the same pass; fsync both.

    The one read of the NFS file yields everything the upload needs: one
    MD5 per upload block (each block's Content-MD5, so the upload never
    hashes or reads a file twice), the whole file's MD5 when it is wanted
    (``whole_md5``, stored on the blob; a file that goes in one request
    always gets it, as that request's Content-MD5), and, for such a small
    file, its bytes.

    ``on_block(offset, length, md5)`` is called as soon as each block is in
    the staging file, so its upload can start while the copy goes on; an
    error it raises comes out as :class:`BlockFailed`. Memory stays at one
    copy chunk (plus the file itself when it goes in one request, at most
    ``single_put_size``). A partial copy is removed on failure so staging
    never fills with junk.
    """
    paths.staged.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    whole = md5.update if whole_md5 else _skip
    block_md5s: list[bytes] = []
    block = hashlib.md5()
    block_start = 0
    done = 0

    def block_done(end: int) -> None:
        digest = block.digest()
        block_md5s.append(digest)
        if on_block is not None:
            try:
                on_block(block_start, end - block_start, digest)
            except (ParentGone, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise BlockFailed(exc) from exc

    try:
        with open(paths.claimed, "rb", buffering=0) as src, \
                open(paths.staged, "wb", buffering=0) as dst:
            source = os.fstat(src.fileno())
            total, mtime_ns = source.st_size, source.st_mtime_ns
            channel.beat("copying", file, 0, total, force=True)
            if total <= single_put_size:
                data = _read_small(src, total)
                md5.update(data)
                _write_all(dst, memoryview(data))
                _fsync_staged(dst)
                _fsync_folder(paths.staged.parent)
                return Staged(len(data), md5.digest(), (), data, mtime_ns)
            buffer = bytearray(COPY_CHUNK)
            view = memoryview(buffer)
            while count := src.readinto(buffer):
                chunk = view[:count]
                whole(chunk)
                _write_all(dst, chunk)
                start = 0
                while start < count:  # a chunk may end a block and start the next
                    take = min(block_start + block_size - done, count - start)
                    block.update(chunk[start:start + take])
                    start += take
                    done += take
                    if done - block_start == block_size:
                        block_done(done)
                        block, block_start = hashlib.md5(), done
                channel.beat("copying", file, done, total)
            if done > block_start or not block_md5s:
                block_done(done)
            _fsync_staged(dst)
        _fsync_folder(paths.staged.parent)
    except BaseException:
        paths.staged.unlink(missing_ok=True)
        raise
    return Staged(done, md5.digest() if whole_md5 else None, tuple(block_md5s),
                  mtime_ns=mtime_ns)


def _skip(chunk: memoryview) -> None:
    """In place of the whole file's MD5 when it is not wanted."""


def _read_small(src, size_hint: int) -> bytes:
    """The whole (small) file, whatever its size turns out to be while read."""
    parts = []
    while part := src.read(max(size_hint, COPY_CHUNK)):
        parts.append(part)
    return b"".join(parts)


def _write_all(dst, data: memoryview) -> None:
    """Unbuffered writes may be short; loop until every byte is written."""
    try:
        while data:
            written = dst.write(data)
            data = data[written:]
    except OSError as exc:
        _name_file(exc, dst.name)
        raise


def _fsync_staged(dst) -> None:
    try:
        os.fsync(dst.fileno())
    except OSError as exc:
        _name_file(exc, dst.name)
        raise


def _name_file(exc: OSError, path: str) -> None:
    """A failed write or fsync names no file; name the staging copy.

    That is how the error tells which disk failed: a full staging disk
    (ENOSPC) must not read as an NFS fault.
    """
    if exc.filename is None:
        exc.filename = path


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable, not only the data."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cleanup(paths: Paths) -> None:
    """Delete the NFS copy (only after the commit), then the staging copy."""
    try:
        paths.claimed.unlink()
    except FileNotFoundError:
        pass  # another replica finished the same file first
    paths.staged.unlink(missing_ok=True)
    paths.attempts.unlink(missing_ok=True)


def read_attempts(paths: Paths) -> int:
    """How many counted attempts this file has used, across restarts."""
    try:
        return int(json.loads(paths.attempts.read_text())["attempts"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        return 0  # a torn record: start again rather than refuse the file


def write_attempts(paths: Paths, attempts: int, error: str) -> None:
    paths.attempts.parent.mkdir(parents=True, exist_ok=True)
    record = {"attempts": attempts, "last_error": error, "time": _now()}
    # A uuid, not the pid: replicas in other pods may have the same pids.
    temp = paths.attempts.with_name(f".{uuid.uuid4().hex}.tmp")
    temp.write_text(json.dumps(record))
    os.replace(temp, paths.attempts)


def quarantine(paths: Paths, job: Job, attempts: int, error: str) -> Path:
    """Move a poison file to ``.failed`` with a sidecar that says why; return where.

    An earlier poison file of the same name, date and session stays: this
    one becomes ``<name>.1`` (``.2``, ...), its sidecar named to match, and
    the sidecar records the original name.
    """
    paths.failed_sidecar.parent.mkdir(parents=True, exist_ok=True)
    target = free_name(paths.failed)
    record = {
        "name": job.name,
        "date": job.date,
        "session": job.session,
        "attempts": attempts,
        "last_error": error,
        "time": _now(),
    }
    (paths.failed_sidecar.parent / target.name).write_text(json.dumps(record, indent=2))
    os.rename(paths.claimed, target)
    paths.attempts.unlink(missing_ok=True)
    paths.staged.unlink(missing_ok=True)
    return target


NAME_MAX = 255


def free_name(path: Path) -> Path:
    """``path`` if nothing is there, else the first free ``path.N``.

    A rename would replace whatever is there, so the name is chosen first.
    Room for the suffix within NAME_MAX bytes is made by dropping characters
    (whole ones, so a UTF-8 name stays valid) from the end of the name.
    """
    n, candidate = 0, path
    while os.path.lexists(candidate):
        n += 1
        suffix, stem = f".{n}", path.name
        while len(os.fsencode(stem + suffix)) > NAME_MAX:
            stem = stem[:-1]
        candidate = path.with_name(stem + suffix)
    return candidate


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def describe_os_error(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "error")
    return f"{code}: {exc.strerror or exc}"


class Uploader:
    """The uploader's main loop: wait for a job, run it, report, repeat."""

    def __init__(self, settings: Settings, channel: Channel, auth_method: str) -> None:
        self.settings = settings
        self.channel = channel
        self.client = blobstore.container_client(settings, auth_method)
        self.host = provenance.host_name()
        self.bucket = TokenBucket(initial_share(settings))
        channel.on(RateLimit, self._set_rate)
        # One pool for the life of the process: block threads are reused
        # from file to file instead of started and joined per file.
        self.pool = ThreadPoolExecutor(settings.azure_max_concurrency,
                                       thread_name_prefix="block")

    def _set_rate(self, message: RateLimit) -> None:
        """The parent sent this uploader's share of the cap: apply it now, mid-file too."""
        if message.bytes_per_s != self.bucket.rate:
            log.debug("upload rate share: %.0f bytes/s", message.bytes_per_s)
        self.bucket.set_rate(message.bytes_per_s)

    def run(self) -> None:
        while True:
            self.channel.beat("idle")
            if not self.channel.poll(1.0):
                continue
            message = self.channel.recv()
            if isinstance(message, Stop):
                return
            if isinstance(message, Job):
                self.channel.send(self.process(message))

    def process(self, job: Job) -> Done | Failed | Gone | Quarantined:
        """Run every step of one job and say how it ended."""
        context = {"file": job.name, "session": job.session, "date": job.date}
        paths = Paths.of(self.settings, job)
        started = time.monotonic()
        self.channel.beat("claiming", job.name, force=True)
        try:
            if not claim(paths, job.claimed, job.seen):
                log.info("file gone or changed before claim (taken elsewhere, or being "
                         "written again)", extra=context)
                return Gone(job, "gone from incoming, or changed since it was found stable")
        except OSError as exc:
            return self._failed(job, paths, StepError("claim", describe_os_error(exc), True))
        try:
            attempts = read_attempts_quietly(paths)
            if attempts >= self.settings.max_attempts:
                return self._quarantine(job, paths, attempts, "attempts exhausted before restart")
            staged, upload_seconds = self._transfer(paths, job)
            size, md5 = staged.size, staged.md5
            self.channel.beat("cleaning", job.name, size, size, force=True)
            self._cleanup(paths)
        except StepError as exc:
            return self._failed(job, paths, exc)
        except Vanished:
            log.info("claimed file vanished: another replica finished it", extra=context)
            return Gone(job, "claimed file vanished (another replica finished it)")
        except (ParentGone, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug must cost one attempt, not the process
            log.exception("unexpected error", extra=context)
            return self._failed(job, paths, StepError("internal", repr(exc), True))
        seconds = time.monotonic() - started
        mb_per_s = size / 1e6 / upload_seconds if upload_seconds > 0 else 0.0
        log.info(
            "uploaded %s (%d bytes) in %.2f s",
            job.blob_name,
            size,
            seconds,
            extra={**context, "size": size, "seconds": round(seconds, 3),
                   "mb_per_s": round(mb_per_s, 1)},
        )
        return Done(job, size, md5.hex() if md5 else "", seconds, upload_seconds)

    def _transfer(self, paths: Paths, job: Job) -> tuple[Staged, float]:
        """Stage the file and upload it, the two overlapped.

        Each block is uploaded (from the staging file) as soon as the copy
        has written it, so the network is busy from the first block on and
        a file's copy costs no extra wall time. The blob is committed only
        once the whole file is staged and fsynced and every block is in.
        Returns what was staged and the seconds from first block to commit.
        """
        copied = False
        size_hint = [0]

        def progress(current: int, total: int | None) -> None:
            if copied:  # while copying, the copy's progress is what operators need
                self.channel.beat("uploading", job.name, current, total or size_hint[0])

        upload = blobstore.BlockUpload(self.client, self.settings, job.blob_name,
                                       str(paths.staged), self.pool, progress,
                                       self.bucket, self.channel.renew)
        try:
            staged = self._stage(paths, job, upload.add)
            copied, size_hint[0] = True, staged.size
            self.channel.beat("uploading", job.name, upload.uploaded, staged.size, force=True)
            started = upload.started or time.monotonic()
            metadata = provenance.blob_metadata(job, staged.size, staged.mtime_ns, staged.md5,
                                                self.host)
            try:
                if staged.data is not None:
                    blobstore.put_whole(self.client, job.blob_name, str(paths.staged), staged,
                                        upload.tier, metadata)
                else:
                    upload.commit(staged.size, staged.md5, metadata)
            except ParentGone:
                raise
            except Exception as exc:
                raise self._upload_error(exc) from exc
            return staged, time.monotonic() - started
        finally:
            upload.close()

    def _stage(self, paths: Paths, job: Job, on_block) -> Staged:
        try:
            return stage(paths, self.channel, job.name, self.settings.azure_max_block_size,
                         self.settings.azure_max_single_put_size, on_block,
                         self.settings.azure_put_md5)
        except BlockFailed as exc:
            cause = exc.__cause__ or exc
            raise self._upload_error(cause) from cause
        except FileNotFoundError as exc:
            if not os.path.lexists(paths.claimed):
                raise Vanished() from exc
            raise StepError("copy", f"copy failed: {describe_os_error(exc)}", True) from exc
        except OSError as exc:
            if exc.filename and str(exc.filename).startswith(
                    str(self.settings.local_staging_root)):
                raise self._staging_failure(exc, paths) from exc
            raise StepError("copy", f"copy failed (nfs): {describe_os_error(exc)}",
                            True) from exc

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
            return StepError("copy", message, True)
        size, capacity = file_size(paths.claimed), staging_capacity(paths.staged.parent)
        if size > capacity:
            return StepError("copy", f"{message}: the file ({size} bytes) is larger than "
                             f"the whole staging filesystem ({capacity} bytes)", True)
        return StepError("copy", f"{message}: staging is full ({size} bytes needed, "
                         f"{capacity} in all); retried, not counted against the file", False)

    @staticmethod
    def _upload_error(exc: BaseException) -> StepError:
        message = f"upload failed: {blobstore.describe_error(exc)}"
        return StepError("upload", message, not blobstore.is_outage(exc))

    def _cleanup(self, paths: Paths) -> None:
        try:
            cleanup(paths)
        except OSError as exc:
            # The blob is committed; the file stays claimed and is uploaded
            # again later (same bytes, overwrite), which is safe.
            raise StepError("cleanup", f"cleanup failed: {describe_os_error(exc)}",
                            False) from exc

    def _failed(self, job: Job, paths: Paths, exc: StepError) -> Failed | Quarantined:
        context = {"file": job.name, "session": job.session, "date": job.date,
                   "error": str(exc)}
        if exc.stage != "cleanup":
            paths.staged.unlink(missing_ok=True)
        attempts = self._count(paths, exc) if exc.counted else read_attempts_quietly(paths)
        if exc.counted and attempts >= self.settings.max_attempts:
            return self._quarantine(job, paths, attempts, str(exc))
        log.error("%s failed at %s (attempt %d of %d)", job.blob_name, exc.stage, attempts,
                  self.settings.max_attempts, extra=context)
        return Failed(job, str(exc), exc.stage, exc.counted, attempts)

    def _count(self, paths: Paths, exc: StepError) -> int:
        try:
            attempts = read_attempts(paths) + 1
            write_attempts(paths, attempts, str(exc))
            return attempts
        except OSError as write_error:
            log.warning("cannot record the attempt: %s", describe_os_error(write_error),
                        extra={"file": paths.claimed.name})
            return 0

    def _quarantine(self, job: Job, paths: Paths, attempts: int,
                    error: str) -> Quarantined | Failed:
        context = {"file": job.name, "session": job.session, "date": job.date, "error": error}
        try:
            target = quarantine(paths, job, attempts, error)
        except OSError as exc:
            message = f"cannot move to .failed: {describe_os_error(exc)} (after: {error})"
            log.error("%s stays in .processing: %s", job.blob_name, message, extra=context)
            return Failed(job, message, "quarantine", False, attempts)
        log.error("%s moved to %s after %d failed attempts", job.blob_name, target,
                  attempts, extra=context)
        return Quarantined(job, str(target), error)


def initial_share(settings: Settings) -> float:
    """Bytes/s until the parent sends this uploader its share: never more than it could be.

    The parent's share comes at the next tick; until then an equal split of
    the configured cap keeps a fresh uploader from overshooting.
    """
    return settings.azure_max_mbps * 1e6 / settings.worker_concurrency


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def staging_capacity(folder: Path) -> int:
    """Bytes the staging filesystem holds when empty (its whole size)."""
    st = os.statvfs(folder)
    return st.f_blocks * st.f_frsize


def read_attempts_quietly(paths: Paths) -> int:
    try:
        return read_attempts(paths)
    except OSError:
        return 0


UPLOADER_NICE = 10
"""Uploads are batch work that can use every core (an MD5 pass at about
0.7 GB/s per core, two with APP_AZURE_PUT_MD5); the parent's API, its probes and the scanner must not
queue behind them when the pod's CPU limit is reached. Measured with the
machine loaded by other work: /v1/status p99 about 20 ms at nice 10 against
about 36 ms at nice 0; on a quiet machine no difference in throughput or p99
(the uploaders still get all the CPU nothing else wants)."""


def _lower_priority() -> None:
    try:
        os.nice(UPLOADER_NICE)
    except OSError:
        pass  # not allowed here: run at normal priority


def main(conn: Connection, settings: Settings, auth_method: str, role: str) -> None:
    """Entry point of an uploader process."""
    child.start(settings, role)
    _lower_priority()
    channel = Channel(conn)
    try:
        Uploader(settings, channel, auth_method).run()
    except ParentGone:
        return
