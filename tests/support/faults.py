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
import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.azurite import Azurite
from tests.support.service import Layout

MiB = 1024 * 1024


@dataclass(frozen=True)
class FolderLayout(Layout):
    """A layout whose NFS root and staging are given explicitly.

    ``Layout`` puts both under one root; the hardening tests need the NFS
    folders on a FUSE mount or shared between replicas while staging lives
    elsewhere (a tmpfs, or one folder per replica).
    """

    nfs_root: Path = Path("/nonexistent")
    staging_root: Path = Path("/nonexistent")

    @property
    def nfs(self) -> Path:
        return self.nfs_root

    @property
    def staging(self) -> Path:
        return self.staging_root


def folder_layout(nfs: Path, staging: Path) -> FolderLayout:
    layout = FolderLayout(root=nfs, nfs_root=nfs, staging_root=staging)
    layout.make()
    return layout


@contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (``32m``), unmounted on the way out (we run as root)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="ingestd-tmpfs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                   check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        result = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        os.rmdir(mountpoint)


def azurite_settings(azurite: Azurite, container: str) -> dict[str, str]:
    """Service settings pointing at one particular Azurite (e.g. a persistent one)."""
    return {
        "APP_AZURE_ACCOUNT_URL": azurite.account_url,
        "APP_AZURE_CONTAINER": container,
        "APP_AZURE_CONNECTION_STRING": azurite.connection_string,
    }


def assert_all_arrived(azurite: Azurite, container: str, prefix: str,
                       expected: dict[str, str]) -> None:
    """Every expected file is a blob under ``prefix`` and its downloaded bytes match."""
    names = set(azurite.blob_names(container, prefix=prefix))
    missing = {prefix + name for name in expected} - names
    assert not missing, f"missing blobs: {sorted(missing)}"
    wrong = [name for name, md5 in expected.items()
             if azurite.blob_md5(container, prefix + name) != md5]
    assert not wrong, f"blobs whose bytes differ from the source: {wrong}"


LEASES = ".leases"
"""``.processing/.leases``: each running replica's lease (ingestd.leases) stays there
while it runs, by design; it is no leftover. Owner links (``.owner``) are checked."""


def leftovers(layout: Layout) -> dict[str, list[str]]:
    """Files still in incoming, ``.processing`` (bookkeeping included) or staging."""
    found = {}
    for label, folder in (("incoming", layout.incoming), ("processing", layout.processing),
                          ("staging", layout.staging)):
        if folder.exists():
            found[label] = sorted(
                str(p.relative_to(folder)) for p in folder.rglob("*")
                if not p.is_dir() and not (label == "processing"
                                           and p.relative_to(folder).parts[0] == LEASES))
        else:
            found[label] = []
    return found


def assert_nothing_left(layout: Layout) -> None:
    """Incoming, ``.processing`` (even ``.attempts`` records) and staging hold no file."""
    left = leftovers(layout)
    assert left == {"incoming": [], "processing": [], "staging": []}, left


def failed_files(layout: Layout) -> list[Path]:
    """Quarantined files (not their sidecars)."""
    return layout.files_under(layout.failed)


def sidecar(layout: Layout, date: str, session: str, name: str) -> dict:
    return json.loads((layout.failed / date / session / ".errors" / name).read_text())


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


def drop(path: Path, data: bytes) -> str:
    """Write ``data`` as a writer would (short temp dotfile, then rename); return its MD5.

    ``write_random`` derives its temp name from the file name by characters,
    which overflows 255 bytes for long names in multi-byte UTF-8.
    """
    temp = path.with_name(f".drop-{uuid.uuid4().hex}.part")
    temp.write_bytes(data)
    os.rename(temp, path)
    return hashlib.md5(data).hexdigest()
