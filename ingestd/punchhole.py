"""Giving staging space back while a file is still open: ``fallocate(PUNCH_HOLE)``.

Child side. The uploaders punch out each block of a windowed staging copy
once storage has it (:class:`ingestd.filesteps.StagingWindow`); the scanner
asks at its setup check whether the staging filesystem can do it at all
(:func:`supported`), so that the parent never plans a window on one that
cannot (a FUSE filesystem without ``fallocate``, some network filesystems).
"""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from pathlib import Path

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)
"""What a filesystem without hole punching answers (a FUSE one without
``fallocate`` answers ENOSYS to the daemon, EOPNOTSUPP to the caller)."""


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give ``length`` bytes at ``offset`` of a file back to its filesystem; its size stays.

    Python 3.11's ``os`` has ``posix_fallocate`` but no ``fallocate`` with
    flags, so libc's is called. Supported by tmpfs (an emptyDir with
    ``medium: Memory``), ext4 and xfs (a disk-backed emptyDir).
    """
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot release staging space: {os.strerror(code)}")


def supported(folder: Path) -> bool:
    """Can a file in ``folder`` have a hole punched in it? Tried on a small probe file.

    Any other error (a full or read-only disk) is the setup check's to
    report, not this one's: it answers True then, and the copy meets the
    disk as it is.
    """
    probe = folder / f".ingestd-holes-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return True
    try:
        os.write(fd, bytes(8192))
        punch_hole(fd, 0, 4096)
        return True
    except OSError as exc:
        return exc.errno not in UNSUPPORTED
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
