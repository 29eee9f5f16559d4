"""Writers as production has them, and the ledger of every version they finished.

Writers work in the FUSE mount's backing folder (another NFS client, as far
as ingestd can tell), so a frozen mount never blocks them and ``fstat`` on
their descriptor tells the truth: ``st_nlink == 0`` after a write means
ingestd had already unlinked the file, a write that on a real NFS share
would have failed with ESTALE (a "late write", counted, not a violation).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.campaign.schedule import Writer

CHUNK = 1024 * 1024
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


@dataclass
class Version:
    """One finished version of a file: what the invariant must find again.

    ``md5`` and ``size`` are those of the bytes written while the file was
    still linked (all of it, unless a write came late): ingestd answers for
    exactly those. ``late_bytes`` were written after ingestd unlinked the
    file; on NFS those writes fail (ESTALE), so they are counted, not checked.
    """

    writer: int
    kind: str
    name: str
    md5: str
    size: int
    created_s: float
    finished_s: float
    inode: int
    late_bytes: int = 0
    stages: dict[str, str] = field(default_factory=dict)
    """MD5 -> description of the file's states before it was finished (after
    each piece, before the append): names what a blob holds when it holds
    less than the version."""
    replaced_in_incoming: bool = False
    """A later writer's rename swapped this very inode out of incoming: the
    writer, not ingestd, discarded it before ingestd ever took it."""


@dataclass
class Ledger:
    versions: list[Version] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bytes_written: int = 0
    done: dict[int, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, version: Version) -> None:
        with self.lock:
            self.versions.append(version)
            self.bytes_written += version.size + version.late_bytes

    def latest(self, name: str) -> Version | None:
        with self.lock:
            found = [v for v in self.versions if v.name == name]
        return max(found, key=lambda v: v.finished_s) if found else None


CONTENT_CHUNK = 64 * 1024 * 1024
"""``randbytes`` takes its size in bits as a C int: at most 256 MiB per call."""


def content(seed: int, size: int) -> bytes:
    """Bytes derived from the plan's seed (replayable), fast enough for hundreds of MiB."""
    rng = random.Random(seed)
    if size <= CONTENT_CHUNK:
        return rng.randbytes(size)
    return b"".join(
        rng.randbytes(min(CONTENT_CHUNK, size - offset)) for offset in range(0, size, CONTENT_CHUNK)
    )


def rename_exchange(old: Path, new: Path) -> bool:
    """Swap ``old`` and ``new`` atomically (renameat2 RENAME_EXCHANGE); False if ``new`` is gone."""
    result = _libc.renameat2(
        _AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        return False
    raise OSError(code, os.strerror(code), str(new))


class Writers:
    """Runs each planned writer in a thread at its time; ``clock()`` is the run's clock."""

    def __init__(self, incoming: Path, processing: Path, ledger: Ledger, clock) -> None:
        self.incoming = incoming
        self.processing = processing
        self.ledger = ledger
        self.clock = clock
        self.threads: list[threading.Thread] = []
        self.stages: dict[str, str] = {}

    def launch(self, writer: Writer) -> None:
        self.ledger.done[writer.index] = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(writer,), daemon=True, name=f"writer-{writer.index}"
        )
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> list[str]:
        """Wait for every writer; names of those still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _run(self, writer: Writer) -> None:
        try:
            if writer.kind == "rewrite":
                assert writer.after is not None
                self.ledger.done[writer.after].wait(120)
                time.sleep(writer.delay_s)
                self._whole(writer)
            elif writer.kind == "whole":
                self._whole(writer)
            elif writer.kind == "slow":
                self._slow(writer)
            else:
                self._append_after_claim(writer)
        except Exception as exc:  # a writer bug must be loud, not a silent gap in the ledger
            self.ledger.errors.append(
                f"writer {writer.index} ({writer.kind} {writer.name}): {type(exc).__name__}: {exc}"
            )
        finally:
            self.ledger.done[writer.index].set()

    # -------------------------------------------------------------- kinds
    def _whole(self, writer: Writer) -> None:
        """Dot temp file, then into place; a previous version still in incoming is swapped out."""
        data = content(writer.content_seed, writer.size)
        temp = self.incoming / f".w{writer.index}-{uuid.uuid4().hex[:8]}.part"
        with open(temp, "wb") as stream:
            stream.write(data)
            inode = os.fstat(stream.fileno()).st_ino
        target = self.incoming / writer.name
        created = self.clock()
        if rename_exchange(temp, target):
            self._replaced(writer.name, os.lstat(temp).st_ino)
            temp.unlink()
        else:
            os.rename(temp, target)
        self.ledger.add(
            Version(
                writer.index,
                writer.kind,
                writer.name,
                hashlib.md5(data).hexdigest(),
                len(data),
                created,
                self.clock(),
                inode,
            )
        )

    def _replaced(self, name: str, inode: int) -> None:
        with self.ledger.lock:
            for version in self.ledger.versions:
                if version.name == name and version.inode == inode:
                    version.replaced_in_incoming = True

    def _slow(self, writer: Writer) -> None:
        """In place, in pieces, pauses between them, one descriptor open throughout."""
        data = content(writer.content_seed, writer.size)
        path = self.incoming / writer.name
        created = self.clock()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            inode = os.fstat(fd).st_ino
            linked = self._write_pieces(fd, data, 0, writer.pieces, (0.0, *writer.pauses))
        finally:
            os.close(fd)
        self.ledger.add(self._version(writer, data, linked, created, inode))

    def _append_after_claim(self, writer: Writer) -> None:
        """Write, keep the descriptor open until the file is claimed, then append (fix 1)."""
        data = content(writer.content_seed, writer.size + sum(writer.pieces))
        path = self.incoming / writer.name
        created = self.clock()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            inode = os.fstat(fd).st_ino
            linked = self._write_pieces(fd, data, 0, (writer.size,), (0.0,))
            deadline = time.monotonic() + writer.wait_s
            while os.path.lexists(path) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(writer.delay_s)
            linked = self._write_pieces(fd, data, linked, writer.pieces, writer.pauses)
        finally:
            os.close(fd)
        self.ledger.add(self._version(writer, data, linked, created, inode))

    def _version(
        self, writer: Writer, data: bytes, linked: int, created: float, inode: int
    ) -> Version:
        return Version(
            writer.index,
            writer.kind,
            writer.name,
            hashlib.md5(data[:linked]).hexdigest(),
            linked,
            created,
            self.clock(),
            inode,
            late_bytes=len(data) - linked,
            stages=self.stages,
        )

    def _write_pieces(
        self, fd: int, data: bytes, start: int, pieces: tuple[int, ...], pauses: tuple[float, ...]
    ) -> int:
        """Write ``pieces`` of ``data`` from ``start``, each after its pause; return how far
        the file got while still linked.

        ``fstat().st_nlink`` after each write tells whether the file was still
        linked; once it is 0 it stays 0, and every byte from that write on is late.
        (A write that lands just before the unlink but is fstat'ed after it
        counts as late: the ambiguity goes the lenient way, never a false
        violation.) The MD5 of every linked state is kept in ``stages`` to
        name what a blob holds when it holds less.
        """
        offset = linked = start
        unlinked = False
        # An appending writer draws more pauses than pieces: the extra ones go unused.
        for pause, piece in zip(pauses, pieces, strict=False):
            time.sleep(pause)
            view = memoryview(data)[offset : offset + piece]
            while view:
                view = view[os.write(fd, view[:CHUNK]) :]
            offset += piece
            unlinked = unlinked or os.fstat(fd).st_nlink == 0
            if not unlinked:
                linked = offset
                self.stages[hashlib.md5(data[:offset]).hexdigest()] = f"its first {offset} bytes"
        return linked
