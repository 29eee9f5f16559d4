"""Helpers for the hardening tests: folder layouts on fault-injecting mounts,
a size-limited staging filesystem, and the checks every such test ends with.

Why a module of its own: each ``tests/test_hardening_*.py`` injects a real
fault (EIO on a FUSE mount, a full tmpfs, a stopped Azurite, ``kill -9``)
and must then prove the same two things: every file dropped in arrived with
the right bytes, and nothing was left behind in incoming, ``.processing``
or staging.

With the FUSE mount, request ``fuse_mount`` before ``make_service`` in a
test's arguments: the mount's backing folder must exist before the
``layout`` fixture creates incoming in it, and teardown then stops the
services before it unmounts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Moved: the checks to tests/support/checks.py, the settings to service.py (azurite_env).
# Still importable from here for branches written against the old names.
from tests.support.checks import (  # noqa: F401
    assert_all_arrived,
    assert_nothing_left,
    failed_files,
    leftovers,
    metric,
    sidecar,
)
from tests.support.service import Layout
from tests.support.service import azurite_env as azurite_settings  # noqa: F401

MiB = 1024 * 1024


def folder_layout(nfs: Path, staging: Path) -> Layout:
    """``Layout(nfs, staging)``, created: the NFS root and staging in folders of their own."""
    return Layout(nfs, staging).make()


@contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (``32m``), unmounted on the way out (we run as root)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="ingestd-tmpfs-", dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        result = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        os.rmdir(mountpoint)


def drop(path: Path, data: bytes) -> str:
    """Write ``data`` as a writer would (short temp dotfile, then rename); return its MD5.

    ``write_random`` derives its temp name from the file name by characters,
    which overflows 255 bytes for long names in multi-byte UTF-8.
    """
    temp = path.with_name(f".drop-{uuid.uuid4().hex}.part")
    temp.write_bytes(data)
    os.rename(temp, path)
    return hashlib.md5(data).hexdigest()
