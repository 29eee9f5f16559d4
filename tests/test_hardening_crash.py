"""Crash at every step: ``kill -9`` of the whole tree at each stage of a file's life.

Deterministic, not lucky: the NFS folders *and* staging live on the freezable
FUSE mount, and each case freezes the one operation that starts the next
step, on that one file's path. The uploader then sits in the kernel at
exactly that point (``wait_blocked`` proves it, ``/v1/status`` shows the
stage), and the test kills the whole process group there. The freezes are
killable, as on a hard NFS mount, so the kill takes effect at once.

After a restart with the same settings each file must be uploaded with its
exact bytes, at most once more, as one blob, and incoming, ``.processing``
(bookkeeping included) and staging must end up empty. The table is the
architecture's "file's lifecycle", one row per case.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_nothing_left
from tests.support.faults import MiB, folder_layout
from tests.support.fusefs import FreezableMount
from tests.support.service import md5_of, wait_until, write_random

NAME = "crash.bin"
SIZE = 24 * MiB
BLOCK = 4 * MiB


@dataclass(frozen=True)
class Step:
    """Where to stop: freeze ``op`` on ``where`` (a path pattern), expect ``stage``."""

    op: str
    where: str  # "incoming", "claimed" or "staged"
    stage: str
    from_offset: int | None = None
    uploads_after_restart: int = 1


STEPS = {
    "during the claim": Step("rename", "incoming", "claiming"),
    "just after the claim": Step("open", "claimed", "claiming"),
    "mid-copy": Step("read", "claimed", "copying", from_offset=8 * MiB),
    "mid-upload": Step("read", "staged", "uploading", from_offset=8 * MiB),
    "after the commit, before the NFS delete": Step("unlink", "claimed", "cleaning"),
    "after the NFS delete, before the staging delete": Step(
        "unlink", "staged", "cleaning", uploads_after_restart=0
    ),
}


def mount_path(where: str, date: str, session: str) -> str:
    """The file's path inside the mount at that step (exact: no other file matches)."""
    return {
        "incoming": f"/incoming/{NAME}",
        "claimed": f"/.processing/{date}/{session}/{NAME}",
        "staged": f"/staging/{date}/{session}/{NAME}",
    }[where]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", list(STEPS), ids=lambda s: s.replace(" ", "-"))
def test_kill_9_at_each_step_then_restart_uploads_once_and_leaves_nothing(
    step: str,
    fuse_mount: FreezableMount,
    make_service,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    rule = STEPS[step]
    session = f"crash-{list(STEPS).index(step)}"  # a blob prefix of its own per case
    mount = fuse_mount.mountpoint
    layout = folder_layout(mount, mount / "staging")
    settings = {
        "APP_AUTOSTART": "true",
        "APP_AUTOSTART_SESSION": session,
        "APP_AZURE_MAX_BLOCK_SIZE": str(BLOCK),
        "APP_AZURE_MAX_CONCURRENCY": "1",
        "APP_WORKER_CONCURRENCY": "1",
    }
    service = make_service(layout_=layout, **settings)
    date = service.status()["session"]["date_prefix"]
    blob = f"{date}/{session}/{NAME}"
    fuse_mount.freeze(
        rule.op, glob=mount_path(rule.where, date, session), from_offset=rule.from_offset
    )
    # Written in the backing folder: the test process never waits on its own freeze.
    md5 = write_random(fuse_mount.backing_path("incoming", NAME), SIZE)

    # The uploader is now in the kernel at exactly this step.
    blocked = fuse_mount.wait_blocked(1, op=rule.op, timeout=20)
    paths = (mount_path(rule.where, date, session), mount_path("incoming", date, session))
    assert all(b["path"] in paths for b in blocked), blocked

    def at_stage() -> dict | None:
        flights = service.status()["in_flight"]
        return flights[0] if flights and flights[0]["stage"] == rule.stage else None

    flight = wait_until(at_stage, 5, interval=0.05, what=f"stage {rule.stage} ({blocked})")
    assert flight["file"] == NAME
    # (bytes_done is not checked: beats are throttled to 4 a second and the copy
    # reaches the freeze faster; the partial staging copy is checked below.)
    if rule.stage == "uploading":
        blocks = azurite.container_client(azurite_container).get_blob_client(blob)
        staged_blocks = wait_until(
            lambda: blocks.get_block_list("all")[1], 10, what="a block staged in Azure"
        )
        assert 1 <= len(staged_blocks) < SIZE // BLOCK
        assert blob not in azurite.blob_names(azurite_container, prefix=blob), (
            "nothing may be committed mid-upload"
        )
    if rule.stage == "cleaning":
        assert azurite.blob_md5(azurite_container, blob) == md5, "committed before cleanup"

    service.kill_tree()
    # A caller frozen in FUSE gets EINTR within the daemon's 50 ms poll, then dies.
    wait_until(lambda: not service.survivors(), 5, what="every process of the tree gone")
    # Readahead READs the dead process left behind are answered on the daemon's next poll.
    wait_until(lambda: fuse_mount.blocked() == [], 5, what="no call left frozen")
    fuse_mount.thaw()

    # What the crash left on disk, read from the backing folder (no FUSE involved).
    incoming = fuse_mount.backing_path("incoming", NAME)
    claimed = fuse_mount.backing_path(".processing", date, session, NAME)
    staged = fuse_mount.backing_path("staging", date, session, NAME)
    on_disk = [p for p in (incoming, claimed) if p.exists()]
    if rule.uploads_after_restart:
        assert len(on_disk) == 1 and md5_of(on_disk[0]) == md5, on_disk
        assert on_disk[0] == (incoming if rule.where == "incoming" else claimed)
    else:
        assert on_disk == [] and staged.exists(), "NFS copy deleted, staging copy left"
    if rule.stage == "copying":
        assert 0 < staged.stat().st_size < SIZE, "a partial staging copy is left"

    restarted = make_service(layout_=layout, **settings)
    if rule.uploads_after_restart:
        restarted.wait_processed(1, timeout=30)
    else:
        wait_until(lambda: not staged.exists(), 10, what="the stale staging copy removed")
    status = restarted.status()
    assert status["processed_ok"] == rule.uploads_after_restart, "uploaded at most once more"
    assert status["processed_err"] == 0, status["last_error"]
    assert azurite.blob_names(azurite_container, prefix=f"{date}/{session}/") == [blob]
    assert azurite.blob_md5(azurite_container, blob) == md5
    assert_nothing_left(layout)
