"""Poison files: a file whose every read fails is quarantined, the rest flow.

The NFS folders (incoming, .processing, .failed) live on the fault-injecting
FUSE mount, as on /mnt/nfs; staging stays on local disk. The mount answers
EIO to every read of one claimed file, which is what a damaged file on a
real share looks like. After ``APP_MAX_ATTEMPTS`` counted failures the file
must sit in ``.failed/<date>/<session>/`` with a sidecar saying why, the
count must survive a ``kill -9`` of the whole tree, and healthy files in the
same batch must arrive with their exact bytes.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import (
    assert_all_arrived,
    assert_nothing_left,
    failed_files,
    metric,
    sidecar,
)
from tests.support.faults import MiB, folder_layout
from tests.support.fusefs import FreezableMount
from tests.support.service import md5_of, wait_until, write_random


def nfs_on_mount(mount: FreezableMount, tmp_path: Path):
    """incoming, .processing and .failed on the mount; staging on local disk."""
    return folder_layout(mount.mountpoint, tmp_path / "staging")


def attempts_on_record(mount: FreezableMount, date: str, session: str, name: str) -> int:
    """The attempt count the service keeps on NFS, read from the backing folder
    (bypassing FUSE, so the fault rule cannot touch the test's own read)."""
    record = mount.backing_path(".processing", date, session, ".attempts", name)
    try:
        return int(json.loads(record.read_text())["attempts"])
    except FileNotFoundError:
        return 0


@pytest.mark.timeout(90)
def test_unreadable_file_is_quarantined_with_a_sidecar_while_healthy_files_flow(
    fuse_mount: FreezableMount,
    make_service,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    layout = nfs_on_mount(fuse_mount, tmp_path)
    service = make_service(layout_=layout, APP_MAX_ATTEMPTS="2", APP_WORKER_CONCURRENCY="2")
    session = service.start_session("poison")
    date = session["date_prefix"]
    # Only the claimed file itself: its .attempts record and its sidecar stay readable.
    fuse_mount.fail("read", errno.EIO, glob=f"/.processing/{date}/poison/bad.bin")

    poison_md5 = write_random(layout.incoming / "bad.bin", MiB)
    healthy = {
        f"good-{i}.bin": write_random(layout.incoming / f"good-{i}.bin", MiB + i) for i in range(4)
    }

    # After the first counted failure the file waits, claimed, for its retry.
    wait_until(
        lambda: attempts_on_record(fuse_mount, date, "poison", "bad.bin") == 1,
        30,
        interval=0.05,
        what="the first counted failure",
    )
    claimed = fuse_mount.backing_path(".processing", date, "poison", "bad.bin")
    assert claimed.exists()
    assert not (layout.staging / date / "poison" / "bad.bin").exists(), (
        "a failed copy must not leave a staging file"
    )

    status = wait_until(
        lambda: (s := service.status())["quarantined"] == 1 and s,
        30,
        what="the poison file to be quarantined",
    )
    service.wait_processed(len(healthy), timeout=30)
    assert_all_arrived(azurite, azurite_container, f"{date}/poison/", healthy)

    moved = fuse_mount.backing_path(".failed", date, "poison", "bad.bin")
    assert failed_files(layout) == [layout.failed / date / "poison" / "bad.bin"]
    assert md5_of(moved) == poison_md5, "quarantine must keep the file's bytes"
    record = sidecar(layout, date, "poison", "bad.bin")
    assert record["attempts"] == 2
    assert "EIO" in record["last_error"] and "copy" in record["last_error"], record
    assert record["name"] == "bad.bin" and record["session"] == "poison"
    assert f"{date}/poison/bad.bin" not in azurite.blob_names(
        azurite_container, prefix=f"{date}/poison/"
    )

    status = service.status()
    assert status["quarantined"] == 1
    assert status["processed_ok"] == len(healthy)
    assert status["processed_err"] == 2  # one retried failure, then the quarantine
    assert "bad.bin" in status["last_error"] and "EIO" in status["last_error"]
    session_view = next(s for s in status["sessions"] if s["session"] == "poison")
    assert session_view["quarantined"] == 1
    scraped = service.http.get("/metrics").text
    assert metric(scraped, "ingestd_files_quarantined_total") == 1
    assert metric(scraped, "ingestd_upload_failures_total") == 1
    assert fuse_mount.stats()["faults_injected"].get("read", 0) >= 2
    assert_nothing_left(layout)  # .attempts record removed with the quarantine


@pytest.mark.timeout(90)
def test_attempt_count_survives_kill_9_of_the_whole_tree(
    fuse_mount: FreezableMount,
    make_service,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    layout = nfs_on_mount(fuse_mount, tmp_path)
    settings = {
        "APP_MAX_ATTEMPTS": "3",
        "APP_AUTOSTART": "true",
        "APP_AUTOSTART_SESSION": "survivor",
    }
    service = make_service(layout_=layout, **settings)
    date = service.status()["session"]["date_prefix"]
    fuse_mount.fail("read", errno.EIO, glob=f"/.processing/{date}/survivor/bad.bin")
    poison_md5 = write_random(layout.incoming / "bad.bin", MiB)

    # Two counted failures; the third attempt would come 2**2 = 4 s later.
    wait_until(
        lambda: attempts_on_record(fuse_mount, date, "survivor", "bad.bin") == 2,
        30,
        interval=0.05,
        what="two counted failures",
    )
    service.kill_tree()
    assert not service.survivors()
    assert attempts_on_record(fuse_mount, date, "survivor", "bad.bin") == 2
    assert failed_files(layout) == []

    healthy = {"after-restart.bin": write_random(layout.incoming / "after-restart.bin", MiB)}
    restarted = make_service(layout_=layout, **settings)
    wait_until(
        lambda: restarted.status()["quarantined"] == 1, 30, what="quarantine after one more failure"
    )
    restarted.wait_processed(1, timeout=30)
    status = restarted.status()
    assert status["recovered"] == 1
    assert status["processed_err"] == 1, "only one more attempt after the restart"
    record = sidecar(layout, date, "survivor", "bad.bin")
    assert record["attempts"] == 3
    assert md5_of(fuse_mount.backing_path(".failed", date, "survivor", "bad.bin")) == poison_md5
    assert_all_arrived(azurite, azurite_container, f"{date}/survivor/", healthy)
    assert_nothing_left(layout)


@pytest.mark.timeout(90)
def test_a_second_poison_file_of_the_same_name_does_not_replace_the_first(
    fuse_mount: FreezableMount,
    make_service,
    tmp_path: Path,
) -> None:
    """``.failed`` never loses a file: the second ``bad.bin`` becomes ``bad.bin.1``."""
    layout = nfs_on_mount(fuse_mount, tmp_path)
    service = make_service(layout_=layout, APP_MAX_ATTEMPTS="1")
    session = service.start_session("poison")
    date = session["date_prefix"]
    fuse_mount.fail("read", errno.EIO, glob=f"/.processing/{date}/poison/bad.bin")

    first = write_random(layout.incoming / "bad.bin", MiB)
    wait_until(lambda: service.status()["quarantined"] == 1, 30, what="the first quarantine")
    second = write_random(layout.incoming / "bad.bin", MiB + 1)
    wait_until(lambda: service.status()["quarantined"] == 2, 30, what="the second quarantine")

    folder = layout.failed / date / "poison"
    assert failed_files(layout) == [folder / "bad.bin", folder / "bad.bin.1"]
    assert md5_of(fuse_mount.backing_path(".failed", date, "poison", "bad.bin")) == first
    assert md5_of(fuse_mount.backing_path(".failed", date, "poison", "bad.bin.1")) == second
    for stored in ("bad.bin", "bad.bin.1"):
        record = sidecar(layout, date, "poison", stored)
        assert record["name"] == "bad.bin" and "EIO" in record["last_error"], record
    assert_nothing_left(layout)
