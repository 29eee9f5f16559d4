"""A freezable passthrough FUSE filesystem: a stand-in for a hard NFS mount.

Why this exists
---------------
ingestd must survive an NFS server that stops answering. On a ``hard`` mount every
syscall on the share then waits in the kernel forever. Tests need that on a REAL
mount, so this module serves a passthrough FUSE filesystem over a backing folder
from a separate daemon process, and lets the test:

* ``freeze()`` the filesystem (all, or only some operations, paths or offsets):
  handlers wait until ``thaw()``, so callers sit in the kernel's
  ``request_wait_answer`` exactly like callers of a dead NFS server;
* ``fail()`` chosen operations with a chosen errno (EIO, ESTALE, ...), optionally
  only for paths matching a glob and only for the next N calls;
* read ``stats()`` (calls, callers blocked right now, faults injected).

The control channel is a unix socket outside the mount, answered by a thread of
the daemon that never touches the mount, so it stays fast while the mount is
frozen. The pytest process never serves the mount (if it did, a frozen handler
could wedge the test runner itself) and never makes a syscall on the mount.

Layout: daemon side (``ControlState``, ``PassthroughFS``, ``serve``) and test side
(``FreezableMount``, the ``fuse_mount`` fixture). Run the daemon by hand with::

    python -m tests.support.fusefs BACKING MOUNTPOINT CONTROL_SOCKET

Kernel facts this design relies on (measured on this machine, Linux 6.18,
libfuse 3.14.0, see tests/rig/test_fusefs.py):

* Once the daemon has READ a request, the caller's wait is uninterruptible
  after a fatal signal (``request_wait_answer`` falls through to ``wait_event``):
  SIGKILL leaves it in D state until the daemon answers. With ``killable=True``
  (the default) frozen handlers therefore answer EINTR as soon as their caller has
  SIGKILL pending, which reproduces a hard NFS mount (TASK_KILLABLE since 2.6.25).
  ``killable=False`` reproduces the worst case: killed callers stay unreapable
  until thaw.
* flush/fsync/release stay frozen even for killed callers: on NFS the close-time
  writeback wait is uninterruptible too, and a killed process closes its files
  while exiting (SIGKILL is no longer pending then), so it hangs in exit.
* libfuse 3.14 never passes FUSE_PARALLEL_DIROPS to the kernel, so READDIR and the
  LOOKUP of a name without a cached dentry are serialised per directory by a
  kernel mutex (``fuse_lock_inode``). While one such call in ``incoming/`` is
  frozen in the daemon, every other listdir of ``incoming/`` and first lookup of a
  new name in it waits on that mutex in D state, and SIGKILL cannot end it until
  the head call is answered (stat of an already-looked-up name is not affected).
* Opens racing with a rename over the same name can fail with ESTALE (as on NFS);
  renaming over a name that some process holds open is done by libfuse as
  "rename target to .fuse_hiddenNNNN, then rename", like an NFS client's silly
  rename, so that one case is not atomic.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno as _errno
import fnmatch
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# mfusepy loads libfuse at import time and raises OSError when it is missing. Import
# it lazily-tolerant so the fixture can FAIL with a clear message instead of the
# whole test module erroring at collection.
try:
    import mfusepy as _fuse

    _MFUSEPY_ERROR: BaseException | None = None
except Exception as _exc:  # noqa: BLE001 - any load failure means "no usable FUSE"
    _fuse = None  # type: ignore[assignment]
    _MFUSEPY_ERROR = _exc

log = logging.getLogger("fusefs")

FUSERMOUNT = "fusermount3"
DEV_FUSE = "/dev/fuse"

#: Operation names accepted by freeze()/fail(): the handler names of PassthroughFS.
#: "getattr" also covers the kernel's LOOKUP (libfuse's high-level API answers a
#: LOOKUP by calling getattr); "readdir" is only called for the first chunk of a
#: listing (libfuse serves the rest from its own buffer).
OPS: frozenset[str] = frozenset(
    {
        "access",
        "chmod",
        "chown",
        "create",
        "flush",
        "fsync",
        "fsyncdir",
        "getattr",
        "link",
        "mkdir",
        "mknod",
        "open",
        "opendir",
        "read",
        "readdir",
        "readlink",
        "release",
        "releasedir",
        "rename",
        "rmdir",
        "statfs",
        "symlink",
        "truncate",
        "unlink",
        "utimens",
        "write",
    }
)

#: Frozen calls of these ops are NOT answered for a killed caller even when the freeze
#: is killable: NFS waits for writeback uninterruptibly, and the kernel sends FLUSH /
#: RELEASE from a dying process's exit path, which is where "a killed child stays
#: unreapable" comes from in production.
UNKILLABLE_OPS: frozenset[str] = frozenset({"flush", "fsync", "fsyncdir", "release", "releasedir"})

#: libfuse worker threads and kernel background-request limit: both must exceed the
#: number of calls a test freezes at once, or further calls queue where stats()
#: cannot see them (and, for threads, unfrozen calls would starve).
MAX_THREADS = 256
MAX_BACKGROUND = 128

#: How often a frozen handler re-checks thaw and its caller's pending signals.
POLL_S = 0.05

_SIGKILL_MASK = 1 << (signal.SIGKILL - 1)
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100


# --------------------------------------------------------------------------------------
# Daemon side: freeze/fault state shared by FUSE handler threads and the control thread
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FreezeRule:
    """Which calls must wait. ``ops=None`` means every operation."""

    ops: frozenset[str] | None = None
    glob: str | None = None
    from_offset: int | None = None
    killable: bool = True

    def matches(self, op: str, paths: Sequence[str | None], offset: int | None) -> bool:
        """True if this call must block; offset-limited rules only catch read/write."""
        if self.ops is not None and op not in self.ops:
            return False
        if self.glob is not None and not _any_path_matches(paths, self.glob):
            return False
        return self.from_offset is None or (offset is not None and offset >= self.from_offset)

    def describe(self) -> dict[str, Any]:
        return {
            "ops": sorted(self.ops) if self.ops is not None else None,
            "glob": self.glob,
            "from_offset": self.from_offset,
            "killable": self.killable,
        }


@dataclasses.dataclass
class FaultRule:
    """Fail matching calls with ``error``; ``remaining=None`` means until cleared.

    ``after``: the call is carried out first and the error returned anyway,
    as when an NFS server's reply is lost and the client's retransmission
    answers ENOENT or EIO for an operation that did happen (rename only).
    """

    ops: frozenset[str]
    error: int
    glob: str | None = None
    remaining: int | None = None
    after: bool = False

    def matches(self, op: str, paths: Sequence[str | None]) -> bool:
        if op not in self.ops:
            return False
        return self.glob is None or _any_path_matches(paths, self.glob)

    def describe(self) -> dict[str, Any]:
        return {
            "ops": sorted(self.ops),
            "errno": self.error,
            "errno_name": _errno.errorcode.get(self.error, str(self.error)),
            "glob": self.glob,
            "remaining": self.remaining,
            "after": self.after,
        }


@dataclasses.dataclass
class BlockedCall:
    """A handler thread currently held by a freeze (for stats and debugging)."""

    op: str
    path: str | None
    pid: int
    since: float


def _any_path_matches(paths: Sequence[str | None], pattern: str) -> bool:
    """fnmatch on mount-relative paths such as ``/incoming/a.bin`` (``*`` spans ``/``)."""
    return any(p is not None and fnmatch.fnmatchcase(p, pattern) for p in paths)


def _fatal_signal_pending(tid: int) -> bool:
    """True if thread ``tid`` has SIGKILL pending, or is gone.

    The kernel marks every thread of a SIGKILLed process with a pending SIGKILL and
    keeps it pending while the thread waits for our answer, so /proc shows it.
    A vanished caller has nobody waiting, so answering is harmless.
    """
    if tid <= 0:
        return False
    try:
        with open(f"/proc/{tid}/status", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    for line in data.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_MASK:
            return True
    return False


class ControlState:
    """Freeze and fault rules plus counters; every method is thread-safe.

    Handlers call ``gate()`` before touching the backing folder; the control
    thread calls ``command()``. One condition variable wakes frozen handlers on thaw.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._freeze: FreezeRule | None = None
        self._faults: list[FaultRule] = []
        self._blocked: dict[int, BlockedCall] = {}
        self._next_id = 0
        self._calls: Counter[str] = Counter()
        self._blocked_total: Counter[str] = Counter()
        self._faults_injected: Counter[str] = Counter()
        self._interrupted: Counter[str] = Counter()
        self.ready = threading.Event()

    # -- handler side ------------------------------------------------------------------

    def gate(self, op: str, *paths: str | None, offset: int | None = None) -> None:
        """Count the call, wait while a freeze matches it, then apply a matching fault.

        Freeze is checked first: a server that is gone answers nothing, not even errors.
        """
        pid = _caller_pid()
        with self._cond:
            self._calls[op] += 1
            if self._freeze is not None and self._freeze.matches(op, paths, offset):
                self._wait_frozen(op, paths, offset, pid)
            self._apply_fault(op, paths, after=False)

    def done(self, op: str, *paths: str | None) -> None:
        """The call was carried out; fail it now if an ``after`` rule matches."""
        with self._cond:
            self._apply_fault(op, paths, after=True)

    def _wait_frozen(
        self, op: str, paths: Sequence[str | None], offset: int | None, pid: int
    ) -> None:
        """Wait (lock held by the caller, released while waiting) for thaw or a killed caller."""
        call_id = self._next_id
        self._next_id += 1
        self._blocked[call_id] = BlockedCall(op, paths[0] if paths else None, pid, time.monotonic())
        self._blocked_total[op] += 1
        try:
            while self._freeze is not None and self._freeze.matches(op, paths, offset):
                self._cond.wait(POLL_S)
                rule = self._freeze
                if (
                    rule is not None
                    and rule.killable
                    and op not in UNKILLABLE_OPS
                    and _fatal_signal_pending(pid)
                ):
                    self._interrupted[op] += 1
                    raise OSError(_errno.EINTR, f"caller {pid} was killed while {op} was frozen")
        finally:
            del self._blocked[call_id]

    def _apply_fault(self, op: str, paths: Sequence[str | None], after: bool) -> None:
        for rule in self._faults:
            if rule.after == after and rule.matches(op, paths):
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._faults.remove(rule)
                self._faults_injected[op] += 1
                raise OSError(rule.error, os.strerror(rule.error))

    # -- control side ------------------------------------------------------------------

    def freeze(self, rule: FreezeRule) -> None:
        with self._cond:
            self._freeze = rule
            self._cond.notify_all()

    def thaw(self) -> None:
        with self._cond:
            self._freeze = None
            self._cond.notify_all()

    def add_fault(self, rule: FaultRule) -> None:
        with self._cond:
            self._faults.append(rule)

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cond:
            return {
                "ready": self.ready.is_set(),
                "frozen": self._freeze is not None,
                "freeze": self._freeze.describe() if self._freeze is not None else None,
                "calls": dict(self._calls),
                "blocked": [
                    {"op": b.op, "path": b.path, "pid": b.pid, "seconds": round(now - b.since, 3)}
                    for b in self._blocked.values()
                ],
                "blocked_total": dict(self._blocked_total),
                "interrupted": dict(self._interrupted),
                "faults": [r.describe() for r in self._faults],
                "faults_injected": dict(self._faults_injected),
            }

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Execute one control request (a decoded JSON object) and return the reply."""
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "ready": self.ready.is_set(), "pid": os.getpid()}
        if cmd == "freeze":
            ops = request.get("ops")
            self.freeze(
                FreezeRule(
                    ops=_validate_ops(ops) if ops is not None else None,
                    glob=request.get("glob"),
                    from_offset=request.get("from_offset"),
                    killable=bool(request.get("killable", True)),
                )
            )
            return {"ok": True}
        if cmd == "thaw":
            self.thaw()
            return {"ok": True}
        if cmd == "fail":
            count = request.get("count")
            if count is not None and int(count) <= 0:
                raise ValueError("count must be positive or None")
            self.add_fault(
                FaultRule(
                    ops=_validate_ops(request["ops"]),
                    error=int(request["errno"]),
                    glob=request.get("glob"),
                    remaining=None if count is None else int(count),
                    after=bool(request.get("after", False)),
                )
            )
            return {"ok": True}
        if cmd == "clear_faults":
            self.clear_faults()
            return {"ok": True}
        if cmd == "stats":
            return {"ok": True, "stats": self.snapshot()}
        raise ValueError(f"unknown control command {cmd!r}")


def _validate_ops(ops: Iterable[str]) -> frozenset[str]:
    """Reject unknown op names: a typo would never match and a test would pass vacuously."""
    result = frozenset(ops)
    unknown = result - OPS
    if unknown:
        raise ValueError(f"unknown FUSE operation(s) {sorted(unknown)}; known: {sorted(OPS)}")
    if not result:
        raise ValueError("empty operation list")
    return result


def _caller_pid() -> int:
    """Thread id of the process that made the current FUSE request (0 if none)."""
    if _fuse is None:
        return 0
    try:
        return int(_fuse.fuse_get_context()[2])
    except Exception:  # noqa: BLE001 - outside a request there is no context
        return 0


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Unix-socket JSON-lines server; one thread per connection so a slow client blocks nobody."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: str, state: ControlState) -> None:
        self.state = state
        super().__init__(path, _ControlHandler)


class _ControlHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: _ControlServer = self.server  # type: ignore[assignment]
        for line in self.rfile:
            try:
                reply = server.state.command(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - report every error to the client
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


# --------------------------------------------------------------------------------------
# Daemon side: the passthrough filesystem
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check_libc(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_OperationsBase: Any = _fuse.Operations if _fuse is not None else object
_FUSEBase: Any = _fuse.FUSE if _fuse is not None else object


class PassthroughFS(_OperationsBase):
    """Every call goes to the same path under ``backing``, after ``ControlState.gate``.

    File handles are real file descriptors of the backing files, so I/O on an open
    file keeps working after its name is renamed or unlinked.
    """

    use_ns = True  # timestamps as integer nanoseconds (mfusepy >= 3)
    # No nullpath_ok/nopath: with them libfuse passes path=None to read, readdir,
    # flush, ... and globs in freeze()/fail() could not match those calls.

    def __init__(self, backing: str, state: ControlState) -> None:
        self.backing = os.path.realpath(backing)
        self.state = state

    def _full(self, path: str | None) -> str:
        if path is None:
            raise OSError(_errno.ENOENT, "no path (unlinked file without handle)")
        return os.path.join(self.backing, path.lstrip("/"))

    # -- lifecycle ---------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        """Disable every kernel cache that could answer while we are frozen.

        entry/attr/negative timeouts of 0 make each path walk and stat reach the
        daemon (a cached answer would mask a freeze). Page-cache reuse across opens is
        off by default in libfuse 3 (no kernel_cache/auto_cache), and writes are
        write-through (no writeback_cache), so a frozen write blocks the writer.
        Within one open file the kernel still serves pages it has already read
        ahead (max_readahead 128 KiB here), as an NFS client serves its page cache.
        """
        if conn_info is not None:
            # The kernel lets only max_background (default 12) async requests, such as
            # readahead READs, reach the daemon; more frozen readers would then queue
            # inside the kernel instead of in our handlers, invisible to stats().
            conn_info.max_background = MAX_BACKGROUND
            conn_info.congestion_threshold = MAX_BACKGROUND * 3 // 4
        if config is not None:
            config.entry_timeout = 0.0
            config.attr_timeout = 0.0
            config.negative_timeout = 0.0
        self.state.ready.set()
        log.info("FUSE session initialised")

    # -- metadata ----------------------------------------------------------------------

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        self.state.gate("getattr", path)
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_rdev": st.st_rdev,
            "st_size": st.st_size,
            "st_blksize": st.st_blksize,
            "st_blocks": st.st_blocks,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def access(self, path: str, amode: int) -> int:
        self.state.gate("access", path)
        if not os.access(self._full(path), amode):
            raise OSError(_errno.EACCES, "access denied")
        return 0

    def chmod(self, path: str | None, mode: int) -> int:
        self.state.gate("chmod", path)
        os.chmod(self._full(path), stat.S_IMODE(mode))
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self.state.gate("chown", path)
        os.lchown(self._full(path), uid, gid)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self.state.gate("truncate", path)
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def utimens(self, path: str | None, times: Any = None) -> int:
        """``times`` is a ctypes (atime, mtime) timespec array or None (both now).

        Passed to utimensat(2) unchanged so UTIME_NOW/UTIME_OMIT keep their meaning.
        """
        self.state.gate("utimens", path)
        full = os.fsencode(self._full(path))
        _check_libc(_libc.utimensat(_AT_FDCWD, full, times, _AT_SYMLINK_NOFOLLOW))
        return 0

    def readlink(self, path: str) -> str:
        self.state.gate("readlink", path)
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        self.state.gate("statfs", path)
        sv = os.statvfs(self._full(path))
        return {
            key: getattr(sv, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_flag",
                "f_namemax",
            )
        }

    # -- namespace ---------------------------------------------------------------------

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.state.gate("mknod", path)
        os.mknod(self._full(path), mode, dev)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self.state.gate("mkdir", path)
        os.mkdir(self._full(path), stat.S_IMODE(mode))
        return 0

    def rmdir(self, path: str) -> int:
        self.state.gate("rmdir", path)
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path: str) -> int:
        self.state.gate("unlink", path)
        os.unlink(self._full(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        """mfusepy order: ``target`` is the new link's path, ``source`` its content."""
        self.state.gate("symlink", target)
        os.symlink(source, self._full(target))
        return 0

    def link(self, target: str, source: str) -> int:
        """mfusepy order: ``target`` is the new name, ``source`` the existing file."""
        self.state.gate("link", target, source)
        os.link(self._full(source), self._full(target))
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        """Same-filesystem rename(2)/renameat2(2) on the backing folder: atomic.

        ``flags`` (RENAME_NOREPLACE/RENAME_EXCHANGE) arrive through _FUSE.rename_fuse_3;
        plain mfusepy would drop them and silently turn NOREPLACE into overwrite.
        """
        self.state.gate("rename", old, new)
        if flags:
            src, dst = os.fsencode(self._full(old)), os.fsencode(self._full(new))
            _check_libc(_libc.renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, flags))
        else:
            os.rename(self._full(old), self._full(new))
        self.state.done("rename", old, new)
        return 0

    # -- directories -------------------------------------------------------------------

    def opendir(self, path: str) -> int:
        self.state.gate("opendir", path)
        return os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        """Entries with their real inode number and file type.

        With use_ino, libfuse reports the st_ino we give here as d_ino; a bare name
        would be reported with d_ino 0, which readdir(3) treats as a deleted entry
        (the listing comes back empty). scandir gives both without extra syscalls.
        """
        self.state.gate("readdir", path)
        here = os.fstat(fh)
        entries = [(".", {"st_ino": here.st_ino, "st_mode": stat.S_IFDIR}, 0)]
        parent = here if path in (None, "/") else os.lstat(os.path.dirname(self._full(path)))
        entries.append(("..", {"st_ino": parent.st_ino, "st_mode": stat.S_IFDIR}, 0))
        with os.scandir(fh) as it:
            for entry in it:
                attrs = {"st_ino": entry.inode(), "st_mode": _dirent_type(entry)}
                entries.append((entry.name, attrs, 0))
        return entries

    def releasedir(self, path: str | None, fh: int) -> int:
        self.state.gate("releasedir", path)
        os.close(fh)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.state.gate("fsyncdir", path)
        os.fsync(fh)
        return 0

    # -- files -------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        self.state.gate("open", path)
        return os.open(self._full(path), flags)

    def create(self, path: str, mode: int, flags: int | None = None) -> int:
        self.state.gate("create", path)
        open_flags = (flags if flags is not None else os.O_WRONLY | os.O_TRUNC) | os.O_CREAT
        return os.open(self._full(path), open_flags, stat.S_IMODE(mode))

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """Copying variant, kept because mfusepy registers callbacks by method name."""
        buf = bytearray(size)
        return bytes(buf[: self.read_into(path, memoryview(buf), offset, fh)])

    def read_into(self, path: str | None, dest: memoryview, offset: int, fh: int) -> int:
        """Read straight into libfuse's reply buffer (see _FUSE.read): no extra copies."""
        self.state.gate("read", path, offset=offset)
        return os.preadv(fh, [dest], offset)

    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: int) -> int:
        self.state.gate("write", path, offset=offset)
        return os.pwrite(fh, data, offset)

    def flush(self, path: str | None, fh: int) -> int:
        """close(2) of a dup reports deferred write errors of the backing fs, like NFS close."""
        self.state.gate("flush", path)
        os.close(os.dup(fh))
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.state.gate("fsync", path)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        self.state.gate("release", path)
        os.close(fh)
        return 0


def _dirent_type(entry: os.DirEntry[str]) -> int:
    """S_IFMT bits of a directory entry, from d_type when the backing fs provides it."""
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


class _FUSE(_FUSEBase):
    """mfusepy's FUSE with three libfuse-3 callbacks fixed for a faithful passthrough.

    * rename: keep renameat2 flags (mfusepy drops them);
    * utimens: hand the raw timespecs to utimensat (mfusepy turns UTIME_NOW into ~1 s);
    * truncate: pass the file handle so ftruncate works on unlinked open files;
    * read/write: hand Python a memoryview of libfuse's buffer instead of copying it
      into bytes (about 2x the throughput for 1 MiB requests).
    """

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        dest = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
        fh = fip.contents.fh
        return self.operations.read_into(self._path(path), memoryview(dest), offset, fh)

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        src = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
        return self.operations.write(self._path(path), memoryview(src), offset, fip.contents.fh)

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        return self.operations.utimens(self._path(path), buf)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(self._path(path), length, fh)


def _watch_lifeline(state: ControlState, mountpoint: str) -> None:
    """Thaw and lazily unmount when stdin reaches EOF, i.e. the test process is gone.

    Without this, a pytest run killed while the mount is frozen would leave a frozen
    mount (and D-state processes) behind until reboot.
    """
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    log.warning("lifeline closed: thawing and unmounting %s", mountpoint)
    state.thaw()
    state.clear_faults()
    _fusermount("-u", "-z", mountpoint)
    time.sleep(5)
    log.error("FUSE loop did not end after lazy unmount; exiting hard")
    os._exit(3)


def serve(
    backing: str, mountpoint: str, control: str, *, lifeline: bool = False, debug: bool = False
) -> None:
    """Run the daemon in the foreground until the mount goes away."""
    if _fuse is None:
        raise SystemExit(f"mfusepy/libfuse unavailable: {_MFUSEPY_ERROR}")
    # The kernel already applied the caller's umask to create/mkdir modes; a second
    # umask in the daemon would silently change the modes test code asked for.
    os.umask(0)
    state = ControlState()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control)
    server = _ControlServer(control, state)
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    if lifeline:
        threading.Thread(
            target=_watch_lifeline, args=(state, mountpoint), name="lifeline", daemon=True
        ).start()
    options: dict[str, Any] = {
        "foreground": True,
        "fsname": "ingestd-fusefs",
        "subtype": "fusefs",
        # Kernel-side caches off: see PassthroughFS.init_with_config.
        "attr_timeout": 0,
        "entry_timeout": 0,
        "negative_timeout": 0,
        # The kernel checks mode bits against the caller, as an NFS client would;
        # otherwise the root daemon would let every caller do everything.
        "default_permissions": True,
        # No hard_remove: unlinking or renaming over an open file makes libfuse rename
        # it to .fuse_hiddenNNNN until closed, just as an NFS client "silly-renames"
        # it to .nfsNNNN. With hard_remove, fstat() on such a file fails with ESTALE.
        "use_ino": True,
        "readdir_ino": True,
        # Enough workers that many frozen calls never starve unfrozen ones (listing
        # while reads are frozen) and every caller reaches the daemon.
        "max_threads": MAX_THREADS,
        "debug": debug,
    }
    if os.geteuid() == 0:
        # Root may use allow_other without /etc/fuse.conf; lets test children that
        # drop privileges use the mount. default_permissions keeps it safe.
        options["allow_other"] = True
    log.info("serving %s on %s (control %s)", backing, mountpoint, control)
    try:
        _FUSE(PassthroughFS(backing, state), mountpoint, **options)
    finally:
        state.thaw()
        server.shutdown()
        with contextlib.suppress(OSError):
            os.unlink(control)
        log.info("FUSE loop ended")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Freezable passthrough FUSE filesystem for tests")
    parser.add_argument("backing", help="absolute path of the folder to serve")
    parser.add_argument("mountpoint", help="absolute path of the (empty) mount point")
    parser.add_argument("control", help="absolute path of the control socket (outside the mount)")
    parser.add_argument(
        "--lifeline",
        action="store_true",
        help="thaw and unmount when stdin reaches EOF (the parent is gone)",
    )
    parser.add_argument("--debug", action="store_true", help="libfuse request tracing on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s fusefs[%(process)d] %(levelname)s %(message)s",
    )
    for name in ("backing", "mountpoint", "control"):
        if not os.path.isabs(getattr(args, name)):
            parser.error(f"{name} must be an absolute path (the daemon may change directory)")
    serve(args.backing, args.mountpoint, args.control, lifeline=args.lifeline, debug=args.debug)
    return 0


# --------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------


class FuseUnavailable(RuntimeError):
    """FUSE cannot be used on this machine; the fixture turns this into a test FAILURE."""


class ControlError(RuntimeError):
    """The daemon rejected a control request or could not be reached."""


def check_fuse_available() -> None:
    """Raise FuseUnavailable with an actionable message if FUSE tests cannot run here."""
    problems: list[str] = []
    if not os.path.exists(DEV_FUSE):
        problems.append(f"{DEV_FUSE} does not exist (container needs --device /dev/fuse)")
    elif not stat.S_ISCHR(os.stat(DEV_FUSE).st_mode):
        problems.append(f"{DEV_FUSE} is not a character device")
    else:
        try:
            os.close(os.open(DEV_FUSE, os.O_RDWR))
        except OSError as exc:
            problems.append(f"cannot open {DEV_FUSE}: {exc}")
    if shutil.which(FUSERMOUNT) is None:
        problems.append(f"{FUSERMOUNT} not on PATH (apt-get install fuse3)")
    if _fuse is None:
        problems.append(
            f"mfusepy/libfuse3 not loadable: {_MFUSEPY_ERROR}"
            " (apt-get install libfuse3-3; pip install mfusepy)"
        )
    if problems:
        raise FuseUnavailable("FUSE is required for the hung-NFS tests: " + "; ".join(problems))


def _unescape_mountinfo(field: str) -> str:
    """Decode the octal escapes (\\040 for space, ...) used in /proc/self/mountinfo."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Is anything mounted exactly at ``mountpoint``? Reads /proc, never touches the mount.

    os.path.ismount() would stat the mount root, which blocks while frozen.
    ``mountpoint`` must already be a resolved path (resolving it also stats it).
    """
    target = os.fspath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return any(_unescape_mountinfo(line.split()[4]) == target for line in fh)


class FreezableMount:
    """Test-side handle of one running daemon and its mount. Start with ``start()``.

    Every method talks to the daemon over the control socket or reads /proc; none
    makes a syscall on the mount, so they are all safe while it is frozen.
    """

    def __init__(
        self,
        backing: Path,
        mountpoint: Path,
        control: Path,
        process: subprocess.Popen[bytes],
        log_path: Path,
        workdir: Path | None,
    ) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.control = control
        self.process = process
        self.log_path = log_path
        self._workdir = workdir
        self._unmounted = False

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        backing: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 15.0,
        debug: bool = False,
    ) -> FreezableMount:
        """Start the daemon serving ``backing`` and wait until the mount answers.

        Without ``mountpoint`` a private directory under /tmp holds the mount point,
        control socket and daemon log: short paths (unix socket paths are limited to
        108 bytes) and outside pytest's tmp_path, whose cleanup must never walk into a
        mount.
        """
        check_fuse_available()
        backing_path = Path(os.path.realpath(backing))
        if not backing_path.is_dir():
            raise NotADirectoryError(f"backing folder {backing_path} does not exist")
        workdir = Path(tempfile.mkdtemp(prefix="ingestd-fuse-", dir="/tmp"))
        if mountpoint is None:
            mount_path = workdir / "mnt"
            mount_path.mkdir()
        else:
            mount_path = Path(os.path.realpath(mountpoint))
            mount_path.mkdir(parents=True, exist_ok=True)
        if is_mounted(mount_path):
            raise RuntimeError(f"{mount_path} is already a mount point")
        control = workdir / "ctl.sock"
        log_path = workdir / "daemon.log"
        script = str(Path(__file__).resolve())
        cmd = [sys.executable, "-u", script, str(backing_path), str(mount_path), str(control)]
        cmd.append("--lifeline")
        if debug:
            cmd.append("--debug")
        with open(log_path, "wb") as log_fh:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,  # the lifeline: EOF tells the daemon we are gone
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd="/",
                # Own session: a Ctrl-C aimed at pytest must not kill the daemon before
                # teardown has thawed and unmounted.
                start_new_session=True,
            )
        mount = cls(backing_path, mount_path, control, process, log_path, workdir)
        try:
            mount._wait_ready(timeout)
        except BaseException:
            mount.unmount()
            raise
        return mount

    def _wait_ready(self, timeout: float) -> None:
        """Ready = daemon alive, FUSE INIT done (init callback ran) and listed in mountinfo."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"FUSE daemon exited with {self.process.returncode} during start:\n"
                    + self.log_tail()
                )
            if self.control.exists():
                with contextlib.suppress(ControlError, OSError):
                    ready = self._request({"cmd": "ping"}, timeout=1.0).get("ready")
                    if ready and is_mounted(self.mountpoint):
                        return
            time.sleep(0.02)
        raise RuntimeError(
            f"FUSE mount {self.mountpoint} not ready after {timeout} s:\n" + self.log_tail()
        )

    def unmount(self, timeout: float = 10.0) -> None:
        """Tear everything down; idempotent, safe on a frozen mount and after failures.

        Order matters:
        1. thaw and clear faults: waiting callers (test children) finish normally
           instead of being aborted, and nothing new blocks during teardown;
        2. ``fusermount3 -u``; if the mount is busy (a process still has a cwd or
           open file in it), ``-u -z`` detaches it lazily so no path leads to it;
        3. wait for the daemon to leave its FUSE loop (the kernel ends the session on
           unmount); SIGKILL it if it does not, which aborts the connection so any
           remaining waiter gets ENOTCONN instead of hanging;
        4. if a mount entry is still listed (daemon died first), lazy-unmount it;
        5. remove the private directory, never recursing into a mount point.
        """
        if self._unmounted:
            return
        errors: list[str] = []
        if self.process.poll() is None:
            for req in ({"cmd": "thaw"}, {"cmd": "clear_faults"}):
                try:
                    self._request(req, timeout=2.0)
                except (ControlError, OSError) as exc:
                    errors.append(f"{req['cmd']}: {exc}")
        if is_mounted(self.mountpoint):
            res = _fusermount("-u", self.mountpoint)
            if res.returncode != 0 and is_mounted(self.mountpoint):
                log.warning("fusermount3 -u failed (%s); lazy unmount", res.stderr.strip())
                _fusermount("-u", "-z", self.mountpoint)
        self._stop_daemon(timeout)
        if is_mounted(self.mountpoint):
            res = _fusermount("-u", "-z", self.mountpoint)
            if is_mounted(self.mountpoint):
                errors.append(f"mount still present after lazy unmount: {res.stderr.strip()}")
        self._unmounted = True
        self._remove_workdir()
        if errors and is_mounted(self.mountpoint):
            raise RuntimeError(f"could not clean up FUSE mount {self.mountpoint}: {errors}")

    def _stop_daemon(self, timeout: float) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # lifeline: the daemon unmounts itself if still mounted
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("FUSE daemon %s ignored unmount; SIGKILL", self.process.pid)
            self.process.kill()
            self.process.wait(timeout)

    def _remove_workdir(self) -> None:
        if self._workdir is None:
            return
        for name in ("ctl.sock",):
            with contextlib.suppress(FileNotFoundError):
                (self._workdir / name).unlink()
        mnt = self._workdir / "mnt"
        if mnt.exists() and not is_mounted(mnt):
            with contextlib.suppress(OSError):
                mnt.rmdir()
        # daemon.log stays until the directory is empty-able: keep it for post-mortems
        # only when something is left behind.
        with contextlib.suppress(OSError):
            (self._workdir / "daemon.log").unlink()
            self._workdir.rmdir()

    def __enter__(self) -> FreezableMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    # -- paths -------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        """Absolute path inside the mount (pure string join: no syscall)."""
        return self.mountpoint.joinpath(*parts)

    def backing_path(self, *parts: str) -> Path:
        """The same location in the backing folder: bypasses FUSE, never blocks."""
        return self.backing.joinpath(*parts)

    # -- control -----------------------------------------------------------------------

    def freeze(
        self,
        ops: Iterable[str] | None = None,
        *,
        glob: str | None = None,
        from_offset: int | None = None,
        killable: bool = True,
    ) -> None:
        """Make matching calls wait in the daemon until ``thaw()`` (replaces any earlier freeze).

        ops: operation names (see ``OPS``); None freezes everything.
        glob: fnmatch pattern on mount-relative paths ("/incoming/*.bin"); for
            rename/link it matches either name.
        from_offset: only read/write at or beyond this byte offset block, so a copy
            stalls mid-file (the reader still gets up to one readahead window more).
        killable: answer EINTR to a frozen caller once it has SIGKILL pending (hard
            NFS mount semantics); False keeps killed callers in D state until thaw.
            flush/fsync/release never yield to SIGKILL (see UNKILLABLE_OPS).
        Calls already past the freeze point finish normally.
        """
        self._request(
            {
                "cmd": "freeze",
                "ops": None if ops is None else _op_list(ops),
                "glob": glob,
                "from_offset": from_offset,
                "killable": killable,
            }
        )

    def thaw(self) -> None:
        """Release every frozen call; they then run against the backing folder."""
        self._request({"cmd": "thaw"})

    def fail(
        self,
        op: str | Iterable[str],
        errno: int,
        glob: str | None = None,
        count: int | None = None,
        after: bool = False,
    ) -> None:
        """Make matching calls fail with ``errno`` (checked after any freeze).

        count: fail only the next ``count`` matching calls, then remove the rule;
            None fails until ``clear_faults()``. Rules add up; the first match wins.
        after: carry the call out, then fail it (a lost reply; rename only).
        Beware: a failed READ may be a readahead the kernel silently retries, so for
        ``read`` prefer count=None.
        """
        self._request(
            {
                "cmd": "fail",
                "ops": _op_list(op),
                "errno": int(errno),
                "glob": glob,
                "count": count,
                "after": after,
            }
        )

    def clear_faults(self) -> None:
        self._request({"cmd": "clear_faults"})

    def stats(self) -> dict[str, Any]:
        """Counters from the daemon: calls, blocked (now), blocked_total, interrupted, faults..."""
        return self._request({"cmd": "stats"})["stats"]

    def blocked(self, op: str | None = None) -> list[dict[str, Any]]:
        """Calls currently held by the freeze, optionally only those of one op."""
        return [b for b in self.stats()["blocked"] if op is None or b["op"] == op]

    def wait_blocked(
        self,
        count: int = 1,
        *,
        op: str | None = None,
        pid: int | None = None,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` matching calls are blocked; raise TimeoutError otherwise.

        This is how a test knows a child really sits on the frozen mount (rather than
        sleeping for a guessed time).
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [
                b for b in self.blocked(op) if pid is None or pid in (b["pid"], _tgid(b["pid"]))
            ]
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"only {len(found)} of {count} blocked call(s) (op={op}, pid={pid})"
                    f" after {timeout} s"
                )
            time.sleep(0.02)

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no daemon log)"

    def _request(self, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """One JSON request per connection: no shared state to corrupt between calls."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.control))
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as reader:
                    line = reader.readline()
            except OSError as exc:
                raise ControlError(f"control socket {self.control}: {exc}") from exc
        if not line:
            raise ControlError(f"daemon closed the control connection on {request['cmd']}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        return reply


def _op_list(ops: str | Iterable[str]) -> list[str]:
    """Validate on the test side too, so a typo fails right where it was written."""
    return sorted(_validate_ops([ops] if isinstance(ops, str) else ops))


def _tgid(tid: int) -> int | None:
    """Process id (thread group id) of thread ``tid``; FUSE reports the calling thread."""
    try:
        with open(f"/proc/{tid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _fusermount(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FUSERMOUNT, *map(os.fspath, args)], check=False, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[FreezableMount]:
    """A live freezable mount over ``tmp_path / "nfs"`` (function scope).

    Fails (never skips) when FUSE is unavailable: a skipped hung-NFS test would hide
    exactly the defect these tests exist to catch. Teardown always thaws and
    unmounts, even when the test failed or left children blocked on the mount.
    """
    try:
        check_fuse_available()
    except FuseUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    backing = tmp_path / "nfs"
    backing.mkdir()
    mount = FreezableMount.start(backing)
    try:
        yield mount
    finally:
        mount.unmount()


if __name__ == "__main__":
    sys.exit(main())
