"""The file steps an uploader performs on NFS and in staging: claim -> stage -> clean up.

Each step is a plain function of one job's :class:`Paths`, so tests can call
them directly; the loop that runs them, one file at a time, and the upload
between stage and cleanup are :mod:`ingestd.uploader`.

Every step leaves the disk in a state that says what to do after a crash:

* claimed: the file sits in ``.processing/<date>/<session>/``; recovery finds it.
* staged: a local copy, fsynced, whose MD5 was computed in the same pass;
  for a file sent in blocks, then a record of its size and block MD5s
  (``<staging>/<date>/<session>/.blocks/<name>``), written after the fsync.
  A retry after an outage uploads from that copy without reading NFS again.
* sent: each block staged in storage under an ID made of its MD5 and index;
  a retry (or recovery after a crash) asks storage which are there and
  sends only the others.
* uploaded: the blob is committed (overwrite, so a retry is harmless).
* cleaned: the NFS copy is deleted only now, then the staging copy.

A file that fails ``APP_MAX_ATTEMPTS`` times for reasons of its own (not an
outage) is moved to ``.failed/<date>/<session>/`` with a sidecar saying why
(:func:`quarantine`). Attempts are counted on NFS, next to the claimed file,
so they survive restarts (:func:`read_attempts`, :func:`write_attempts`).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ingestd import blobupload, config, leases, md5pair, punchhole, scanner
from ingestd.blobupload import Staged
from ingestd.childruntime import Channel, ParentGone
from ingestd.config import Settings
from ingestd.messages import ChildState, Job, Signature, Stage

COPY_CHUNK = config.STAGING_COPY_CHUNK
"""Bytes per read from NFS while staging: as cheap per GiB as larger reads
(hashing dominates; the NFS client reads ahead anyway) and less resident
memory. Figures: bench/RESULTS.md."""
ATTEMPTS_FOLDER = ".attempts"
ERRORS_FOLDER = ".errors"
RECORDS_FOLDER = scanner.RECORDS_FOLDER
"""Beside the staging copies: what each complete copy holds (size, block MD5s)."""


class StepError(Exception):
    """A step failed; carries the stage, whether it counts against the file,
    and the kind of storage outage when that is what failed."""

    def __init__(self, stage: Stage, message: str, counted: bool, outage: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.counted = counted
        self.outage = outage


class Vanished(Exception):
    """The claimed file disappeared: another replica uploaded and deleted it."""


@dataclass(frozen=True)
class Paths:
    """Where one job's file lives at each step."""

    incoming: Path
    claimed: Path
    staged: Path
    staged_record: Path
    attempts: Path
    owner: Path  # the claim's owner link (ingestd.leases)
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
            staged_record=(
                settings.local_staging_root / job.date / job.session / RECORDS_FOLDER / job.name
            ),
            attempts=processing / ATTEMPTS_FOLDER / job.name,
            owner=processing / leases.OWNERS / job.name,
            failed=failed / job.name,
            failed_sidecar=failed / ERRORS_FOLDER / job.name,
        )


# The steps. Each is a plain function of paths, so tests can call them directly.


def claim(paths: Paths, job: Job, owner: str) -> bool:
    """Move the file into ``.processing``; False if it is not this job's to upload.

    ``owner`` is this replica's lease token. The claim's owner link (see
    :mod:`ingestd.leases`) is taken before the rename and is the lock
    between replicas: a file whose link names another replica is not ours,
    whether it still is in incoming (being claimed) or already claimed.

    The rename is the lock (PRD FR-3): for a file seen in incoming, finding it
    gone means another replica won the rename, and the file is skipped rather
    than uploaded twice. A file this instance is known to have claimed
    (``job.claimed``: recovered, or its uploader reported the rename) is
    continued from ``.processing``. When an uploader died holding the job
    (``job.maybe_claimed``), the copy in ``.processing`` is taken if it is
    there; if it is not, the rename never happened and the file is claimed
    from incoming like a new one, stability check included.

    A claimed copy is never overwritten by a newer file of that name: the
    older one is finished first and the newer waits in incoming.

    ``job.seen`` is the (size, mtime) the scanner found stable. A file may
    wait in the queue for a long time; if a writer has started on it again
    since, it is not taken half-written but skipped, and offered again once
    stable.
    """
    if job.claimed:
        return os.path.lexists(paths.claimed) and leases.holder(paths.owner) == owner
    if os.path.lexists(paths.claimed):
        return (job.maybe_claimed or os.path.lexists(paths.incoming)) and leases.take(
            paths.owner, owner
        )
    if job.seen is not None and _size_mtime(paths.incoming) != job.seen:
        return False
    if not leases.take(paths.owner, owner):
        return False  # another replica is claiming it, or holds an older copy
    if _rename_into(paths.incoming, paths.claimed):
        return True
    leases.release_if_unclaimed(paths.owner, paths.claimed, owner)
    return False


def _rename_into(source: Path, target: Path) -> bool:
    """Rename ``source`` to ``target`` (which did not exist); False if ``source`` is gone.

    Called only by the holder of the file's owner link, so no other replica
    renames this file meanwhile. Two things can then make a rename report
    failure on NFS although it did not fail. A retransmitted request whose
    first copy already renamed the file answers ENOENT or EIO: the file
    found at ``target`` and no longer at ``source`` means the rename
    happened, and the claim goes on. And a folder emptied by another
    uploader's cleanup can disappear between our ``mkdir`` and the rename,
    so the folder is made again and the rename retried.
    """
    for _ in range(3):
        make_folder(target.parent)
        try:
            os.rename(source, target)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EIO):
                raise
            if os.path.lexists(source):
                if exc.errno == errno.EIO:
                    raise
                continue  # the folder vanished under us: make it again
            # At the target: it happened and the reply was lost. Nowhere: taken
            # away (by hand, or by a replica without leases).
            return os.path.lexists(target)
    raise FileNotFoundError(errno.ENOENT, "the claim folder keeps disappearing", str(target))


def _size_mtime(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def signature(path: Path) -> Signature | None:
    """(size, mtime_ns, inode) of ``path``, or None if nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class BlockFailed(Exception):
    """A block upload failed while the file was still being staged."""


def stage(
    paths: Paths,
    channel: Channel,
    file: str,
    block_size: int,
    single_put_size: int,
    on_block: Callable[[int, int, bytes], None] | None = None,
    whole_md5: bool = True,
    window: StagingWindow | None = None,
) -> Staged:
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

    With a ``window`` (a file too large to stage whole), the copy never
    holds more than the window in staging: before each chunk is written it
    waits (beating) until enough blocks are acknowledged by storage, whose
    space is then released (see :class:`StagingWindow`). The hashing, the
    blocks and their uploads are the same pass as without one.
    """
    block_md5s: list[bytes] = []
    block_start = 0
    done = 0

    def block_done(end: int, digest: bytes) -> None:
        block_md5s.append(digest)
        if on_block is not None:
            try:
                on_block(block_start, end - block_start, digest)
            except (ParentGone, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise BlockFailed(exc) from exc

    try:
        with open(paths.claimed, "rb", buffering=0) as src, _create_staged(paths.staged) as dst:
            opened = os.fstat(src.fileno())
            total = opened.st_size
            staged_ino = os.fstat(dst.fileno()).st_ino
            channel.beat(ChildState.COPYING, file, 0, total, force=True)
            if total <= single_put_size:
                data = _read_small(src, total)
                _write_all(dst, memoryview(data))
                _fsync_staged(dst)
                _fsync_folder(paths.staged.parent)
                return Staged(
                    len(data),
                    hashlib.md5(data).digest(),
                    (),
                    data,
                    _read_version(opened, len(data)),
                    staged_ino,
                )
            # Both MD5s of each byte (its block's, the whole file's) in one pass.
            hashes = md5pair.pair(block_size) if whole_md5 else md5pair.BlockOnly()
            buffer = bytearray(COPY_CHUNK)
            view = memoryview(buffer)
            while count := src.readinto(buffer):
                chunk = view[:count]
                if window is not None:
                    _make_room(window, dst, count)
                _write_all(dst, chunk)
                start = 0
                while start < count:  # a chunk may end a block and start the next
                    take = min(block_start + block_size - done, count - start)
                    hashes.update(chunk[start : start + take] if take < count else chunk)
                    start += take
                    done += take
                    if done - block_start == block_size:
                        block_done(done, hashes.split())
                        block_start = done
                channel.beat(ChildState.COPYING, file, done, total)
            if done > block_start or not block_md5s:
                block_done(done, hashes.split())
            _fsync_staged(dst)
        _fsync_folder(paths.staged.parent)
    except BaseException:
        paths.staged.unlink(missing_ok=True)
        raise
    return Staged(
        done, hashes.digest(), tuple(block_md5s), None, _read_version(opened, done), staged_ino
    )


def _make_room(window: StagingWindow, dst: BinaryIO, count: int) -> None:
    """Wait for room for ``count`` more bytes in the window; a failed block is a BlockFailed."""
    try:
        window.room(dst.fileno(), count)
    except (ParentGone, KeyboardInterrupt):
        raise
    except OSError as exc:  # punching a hole in the staging copy
        _name_file(exc, dst.name)
        raise
    except Exception as exc:
        raise BlockFailed(exc) from exc


class StagingWindow:
    """The staging space of one file copied through a window of ``size`` bytes.

    The staging file keeps its full length, but only the blocks not yet
    acknowledged by storage (and the block being copied) occupy space: each
    acknowledged block's range is punched out (:func:`~ingestd.punchhole.punch_hole`). The
    copy asks :meth:`room` before each chunk and waits, beating as a wait on
    the network, while the bytes it holds plus the chunk would exceed the
    window. ``size`` is at least a block and a chunk (see
    ``Settings.staging_window_bytes``), so the copy can always complete the
    block it is on, and an upload then always has something to release.
    """

    def __init__(self, size: int, upload: blobupload.BlockUpload) -> None:
        self.size = size
        self.upload = upload
        self.written = 0  # bytes the copy has written
        self.released = 0  # of which punched out after their block was acknowledged
        self.peak = 0  # the most held at once
        upload.track_acks()

    @property
    def held(self) -> int:
        return self.written - self.released

    def room(self, fd: int, count: int) -> None:
        """Wait until ``count`` more bytes fit, releasing acknowledged blocks."""
        while True:
            for offset, length in self.upload.take_acked():
                punchhole.punch_hole(fd, offset, length)
                self.released += length
            if self.held + count <= self.size or self.held == 0:
                break
            self.upload.wait_for_acks()
        self.written += count
        self.peak = max(self.peak, self.held)


def _read_version(opened: os.stat_result, size: int) -> Signature:
    """The version of the source that the copy read: what cleanup may delete.

    The mtime and inode are those at open, the size what was read to EOF. A
    write during or after the copy (an append through a descriptor the
    writer kept open across the claim, a rewrite) changes the size or the
    mtime, so cleanup then finds another version and keeps the file.
    """
    return size, opened.st_mtime_ns, opened.st_ino


def _create_staged(path: Path) -> BinaryIO:
    """Open the staging copy for writing, making its folder (again if it was just pruned)."""
    for _ in range(3):
        make_folder(path.parent)
        try:
            return open(path, "wb", buffering=0)
        except FileNotFoundError:
            continue  # another uploader removed the emptied folder meanwhile
    return open(path, "wb", buffering=0)


def _read_small(src: BinaryIO, size_hint: int) -> bytes:
    """The whole (small) file, whatever its size turns out to be while read."""
    parts = []
    while part := src.read(max(size_hint, COPY_CHUNK)):
        parts.append(part)
    return b"".join(parts)


def _write_all(dst: BinaryIO, data: memoryview) -> None:
    """Unbuffered writes may be short; loop until every byte is written."""
    try:
        while data:
            written = dst.write(data)
            data = data[written:]
    except OSError as exc:
        _name_file(exc, dst.name)
        raise


def _fsync_staged(dst: BinaryIO) -> None:
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


class Changed(Exception):
    """The claimed file is not the version that was uploaded: it must not be deleted."""


def cleanup(
    paths: Paths,
    uploaded: Signature,
    staged_ino: int | None,
    owner: str = "",
) -> None:
    """Delete the NFS copy, only if it is still the version uploaded; then the staging copy.

    The folders it leaves empty are pruned later, by the uploader
    (:func:`prune_folders`): the next file is likely of the same session.

    A writer that kept its descriptor open across the claim may have
    appended to the claimed file after the copy read to its end; deleting
    it then would lose those bytes. So the file's (size, mtime, inode) must
    still be what the copy read; if not, :class:`Changed` is raised, the
    file is kept and uploaded again whole (overwriting the blob).
    """
    now = signature(paths.claimed)
    if now is not None and now != uploaded:
        raise Changed(
            f"it changed while it was uploaded (size, mtime, inode {uploaded} "
            f"-> {now}): kept, to be uploaded again"
        )
    if now is not None:
        try:
            paths.claimed.unlink()
        except FileNotFoundError:
            pass  # another replica finished the same file first
    leases.release(paths.owner, owner)  # after the file: a claimed file always has one
    discard_staged(paths, staged_ino)
    paths.attempts.unlink(missing_ok=True)


def discard_staged(paths: Paths, staged_ino: int | None = None) -> None:
    """Remove this job's staging copy and its record; with ``staged_ino``, only
    if the copy is that file."""
    if staged_ino is not None:
        try:
            if os.lstat(paths.staged).st_ino != staged_ino:
                return
        except FileNotFoundError:
            return
    paths.staged_record.unlink(missing_ok=True)
    paths.staged.unlink(missing_ok=True)


def write_record(paths: Paths, staged: Staged, block_size: int) -> None:
    """Record what the (fsynced) staging copy holds, so a retry can trust it.

    Written only after the copy and its folder are fsynced, by rename, then
    fsynced itself: a record on disk always describes a complete copy.
    """
    record = {
        "size": staged.size,
        "block_size": block_size,
        "md5": staged.md5.hex() if staged.md5 is not None else None,
        "blocks": [digest.hex() for digest in staged.block_md5s],
        "source": list(staged.source),
        "staged_ino": staged.staged_ino,
    }
    folder = paths.staged_record.parent
    make_folder(folder)
    temp = folder / f".{uuid.uuid4().hex}.tmp"
    with open(temp, "w") as stream:
        stream.write(json.dumps(record))
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp, paths.staged_record)
    _fsync_folder(folder)


def kept_copy(paths: Paths, block_size: int, need_md5: bool) -> Staged | None:
    """The staging copy left by an earlier attempt, if it can be uploaded as it is.

    It can when its record says it is complete (size, block MD5s at this
    block size, the whole MD5 if one is wanted), the copy on disk is that
    file (inode and size), and the NFS file is still the version that was
    copied (size, mtime, inode: one ``lstat``, no read). Its bytes are not
    hashed again: every block carries its recorded MD5 as Content-MD5, so
    storage refuses a block whose bytes differ, and that failure counts
    against the file and discards the copy.
    """
    try:
        record = json.loads(paths.staged_record.read_text())
        source = tuple(record["source"])
        staged = Staged(
            int(record["size"]),
            bytes.fromhex(record["md5"]) if record["md5"] else None,
            tuple(bytes.fromhex(b) for b in record["blocks"]),
            None,
            (int(source[0]), int(source[1]), int(source[2])),
            int(record["staged_ino"]),
        )
        if int(record["block_size"]) != block_size or (need_md5 and staged.md5 is None):
            return None
        copy = os.lstat(paths.staged)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if (copy.st_ino, copy.st_size) != (staged.staged_ino, staged.size):
        return None
    if signature(paths.claimed) != staged.source:
        return None
    return staged


FOLDER_TRIES = 10


def make_folder(folder: Path) -> None:
    """``mkdir -p`` that another uploader's :func:`prune_folders` cannot make fail.

    ``Path.mkdir(parents=True, exist_ok=True)`` is several syscalls: a
    parent removed between two of them fails it with ENOENT, and the folder
    itself removed between its EEXIST and the look that follows fails it
    with EEXIST (seen with two replicas under load: "copy failed (staging):
    EEXIST"). Either way the folder is simply made again.
    """
    for _ in range(FOLDER_TRIES - 1):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except (FileExistsError, FileNotFoundError):
            continue
    folder.mkdir(parents=True, exist_ok=True)


def prune_folders(paths: Paths, roots: tuple[Path, Path]) -> None:
    """Remove the job's session and date folders under ``.processing`` and staging once empty.

    Best effort: a folder that is not empty, or already gone, stays as it
    is. Whoever writes into these folders makes them again if they vanish
    (see :func:`_rename_into` and :func:`_create_staged`). The uploader
    calls it when it has no work left of that session, not after every
    file (see ``Uploader.prune_emptied``).
    """
    processing_root, staging_root = roots
    _remove_empty(paths.attempts.parent)
    _remove_empty(paths.owner.parent)
    _remove_empty(paths.staged_record.parent)
    for folder, root in (
        (paths.claimed.parent, processing_root),
        (paths.staged.parent, staging_root),
    ):
        while folder != root and root in folder.parents:
            if not _remove_empty(folder):
                break
            folder = folder.parent


def _remove_empty(folder: Path) -> bool:
    try:
        os.rmdir(folder)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False  # not empty (or not ours to remove): leave it


def read_attempts(paths: Paths) -> int:
    """How many counted attempts this file has used, across restarts."""
    try:
        return int(json.loads(paths.attempts.read_text())["attempts"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        return 0  # a torn record: start again rather than refuse the file


def write_attempts(paths: Paths, attempts: int, error: str) -> None:
    make_folder(paths.attempts.parent)
    record = {"attempts": attempts, "last_error": error, "time": _now()}
    # A uuid, not the pid: replicas in other pods may have the same pids.
    temp = paths.attempts.with_name(f".{uuid.uuid4().hex}.tmp")
    temp.write_text(json.dumps(record))
    os.replace(temp, paths.attempts)


def quarantine(paths: Paths, job: Job, attempts: int, error: str, owner: str = "") -> Path:
    """Move a poison file to ``.failed`` with a sidecar that says why; return where.

    An earlier poison file of the same name, date and session stays: this
    one becomes ``<name>.1`` (``.2``, ...), its sidecar named to match, and
    the sidecar records the original name.
    """
    make_folder(paths.failed_sidecar.parent)
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
    leases.release(paths.owner, owner)
    paths.attempts.unlink(missing_ok=True)
    discard_staged(paths)
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
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def describe_os_error(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "error")
    return f"{code}: {exc.strerror or exc}"


def unusable_name(name: str) -> str | None:
    """Why ``name`` can never be a blob name, or None.

    A name that is not valid UTF-8 (it reaches Python with lone surrogates)
    cannot be sent to storage at all; retrying it would only repeat the
    same error, so it goes to ``.failed`` at once with this reason.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return (
            "the file name is not valid UTF-8, so it cannot be a blob name; "
            "rename it (in UTF-8) and move it back to incoming"
        )
    return None


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
