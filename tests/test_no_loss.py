"""Nothing lost under any interleaving: one end-to-end test per way it used to break.

Each test drives the real service (a process, over HTTP) against a real
Azurite, with the NFS folders on the freezable FUSE mount where a fault is
needed, and each fails on the code before its fix: a file deleted although a
writer appended to it after the copy, a half-written file claimed by a retry,
a process that never exits, a recovered file left behind because another
session had one of the same name, a file retried forever, a misconfigured
mount read as a stream of failed claims.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.support.azurite import Azurite
from tests.support.faults import (
    MiB,
    assert_nothing_left,
    failed_files,
    folder_layout,
    sidecar,
    tmpfs,
)
from tests.support.fusefs import FreezableMount
from tests.support.service import (
    Layout,
    Service,
    md5_of,
    run_once,
    scrape,
    wait_until,
    write_random,
)

NAMES = {"APP_AUTOSTART": "true"}


def autostart(session: str, **settings: str) -> dict[str, str]:
    return {**NAMES, "APP_AUTOSTART_SESSION": session, **settings}


def on_mount(
    fuse_mount: FreezableMount, make_service, session: str, **settings: str
) -> tuple[Layout, Service, str]:
    """ingestd watching ``session`` from boot, its NFS folders on the mount, staging beside it.

    Returns the layout, the started service and the session's date prefix.
    """
    mount = fuse_mount.mountpoint
    layout = folder_layout(mount, mount.parent / f"staging-{session}")
    service = make_service(layout_=layout, **autostart(session), **settings)
    return layout, service, service.status()["session"]["date_prefix"]


def uploader_pid(service, name: str) -> int:
    """The pid of the uploader working on ``name`` (from /v1/status)."""

    def find() -> int | None:
        for child in service.children():
            if child["file"] == name and child["role"].startswith("uploader") and child["pid"]:
                return child["pid"]
        return None

    return wait_until(find, 20, what=f"an uploader on {name}")


def error_lines(service, name: str) -> list[str]:
    return [
        line
        for line in service.log_text().splitlines()
        if name in line and ("ERROR" in line or "CRITICAL" in line)
    ]


# 1. Delete only what was uploaded


@pytest.mark.timeout(120)
def test_bytes_appended_through_an_open_descriptor_after_the_copy_are_not_lost(
    make_service,
    layout: Layout,
    azurite_factory,
) -> None:
    """A writer pauses (so the file is claimed), then appends while the blocks are on the wire.

    Blob storage is held (SIGSTOP of Azurite) from before the claim, so the copy
    reads to the end of the file and the upload cannot finish until the
    append is in. The blob must then hold the whole file, and the claimed
    file must not have been deleted under the writer before that.
    """
    private = azurite_factory()
    private.create_container("appends")
    service = make_service(
        **autostart("appends"),
        APP_AZURE_ACCOUNT_URL=private.account_url,
        APP_AZURE_CONTAINER="appends",
        APP_AZURE_CONNECTION_STRING=private.connection_string,
        APP_AZURE_MAX_BLOCK_SIZE=str(4 * MiB),
    )
    date = service.status()["session"]["date_prefix"]
    path = layout.incoming / "growing.bin"
    digest = hashlib.md5()
    with open(path, "wb") as writer:
        first = os.urandom(48 * MiB)
        writer.write(first)
        writer.flush()
        digest.update(first)
        os.kill(private.pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: (
                    service.status()["in_flight"]
                    and service.status()["in_flight"][0]["stage"] == "uploading"
                ),
                30,
                what="the copy to reach the end of the file",
            )
            more = os.urandom(1 * MiB)
            writer.write(more)
            writer.flush()
            digest.update(more)
            assert os.fstat(writer.fileno()).st_nlink == 1, "appended to a deleted file"
        finally:
            os.kill(private.pid, signal.SIGCONT)
    service.wait_processed(1, timeout=60)
    blob = f"{date}/appends/growing.bin"
    assert private.blob_md5("appends", blob) == digest.hexdigest(), "the append is missing"
    assert "changed while it was uploaded" in service.log_text()
    assert_nothing_left(layout)
    # Emptied folders are removed once the uploader has no more work of that
    # session (it prunes when idle for a second, not after every file).
    wait_until(
        lambda: not (layout.processing / date).exists() and not (layout.staging / date).exists(),
        10,
        what="the emptied date folders to be removed",
    )


# 2. "Claimed" means the rename happened


@pytest.mark.timeout(90)
def test_a_retry_after_a_death_before_the_rename_does_not_claim_a_file_being_written(
    fuse_mount: FreezableMount,
    make_service,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """The uploader dies in the rename (which never happens); a writer then rewrites the file.

    The retry must not take the file now in incoming for the one found
    stable: it is half-written. It is taken once the writer is done, whole.
    """
    layout, service, date = on_mount(fuse_mount, make_service, "claim")
    backing = fuse_mount.backing_path("incoming", "rewritten.bin")
    fuse_mount.freeze("rename", glob="/incoming/rewritten.bin")
    write_random(backing, 3 * MiB)
    fuse_mount.wait_blocked(op="rename", timeout=20)
    os.kill(uploader_pid(service, "rewritten.bin"), signal.SIGKILL)
    # The killed rename must be refused, not carried out late at the thaw (a
    # rename the server carries out anyway is the other case: the retry then
    # finds the file in .processing).
    wait_until(
        lambda: fuse_mount.stats()["interrupted"].get("rename"),
        10,
        what="the frozen rename to be interrupted",
    )
    digest = hashlib.md5()
    with open(backing, "wb") as writer:  # the writer starts over: a new version
        fuse_mount.thaw()
        until = time.monotonic() + 4.0  # well past the retry (1 s after the death)
        while time.monotonic() < until:
            piece = os.urandom(64 * 1024)
            writer.write(piece)
            writer.flush()
            digest.update(piece)
            assert backing.exists(), "claimed while the writer was still writing"
            time.sleep(0.1)
    wait_until(
        lambda: azurite.blob_names(azurite_container, f"{date}/claim/"),
        30,
        what="the finished file's blob",
    )
    service.wait_processed(1, timeout=30)
    assert azurite.blob_md5(azurite_container, f"{date}/claim/rewritten.bin") == digest.hexdigest()
    assert_nothing_left(layout)


# 3. Every exit ends in bounded time


@pytest.mark.timeout(60)
def test_a_taken_port_exits_at_once_with_code_2_even_with_nfs_frozen(
    fuse_mount: FreezableMount,
    make_service,
) -> None:
    mount = fuse_mount.mountpoint
    layout = folder_layout(mount, mount.parent / "staging-port")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fuse_mount.freeze(killable=False)  # a child that touched NFS could never die
        service = make_service(
            start=False, layout_=layout, APP_HTTP_PORT=str(port), **autostart("port")
        )
        service.start(wait=False)
        code = service.wait_exit(timeout=30)
    assert code == 2
    assert "cannot listen on 127.0.0.1" in service.log_text()
    assert "APP_HTTP_PORT" in service.log_text()


@pytest.mark.timeout(60)
def test_an_unusable_autostart_session_exits_with_code_2_even_with_nfs_frozen(
    fuse_mount: FreezableMount,
    make_service,
) -> None:
    mount = fuse_mount.mountpoint
    layout = folder_layout(mount, mount.parent / "staging-name")
    fuse_mount.freeze(killable=False)
    service = make_service(start=False, layout_=layout, **autostart(".."))
    service.start(wait=False)
    assert service.wait_exit(timeout=30) == 2
    assert "APP_AUTOSTART_SESSION is not usable" in service.log_text()


# 4. A job is (date, session, name)


@pytest.mark.timeout(60)
def test_recovered_files_of_one_name_in_two_sessions_are_both_uploaded(
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    expected = {}
    for date, session in (("20260101", "one"), ("20260101", "two"), ("20260102", "one")):
        folder = layout.processing / date / session
        folder.mkdir(parents=True)
        expected[f"{date}/{session}/same.bin"] = write_random(folder / "same.bin", 2 * MiB + 1)
    service = make_service()
    service.wait_processed(3, timeout=30)
    for blob, md5 in expected.items():
        assert azurite.blob_md5(azurite_container, blob) == md5, blob
    assert_nothing_left(layout)


# 5. No endless loop on one file


@pytest.mark.timeout(90)
def test_a_cleanup_that_keeps_failing_is_retried_without_uploading_again_then_given_up(
    fuse_mount: FreezableMount,
    make_service,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    layout, service, date = on_mount(fuse_mount, make_service, "cleanup", APP_MAX_ATTEMPTS="3")
    fuse_mount.fail("unlink", errno.EIO, glob="/.processing/*/cleanup/stuck.bin")
    md5 = write_random(layout.incoming / "stuck.bin", 6 * MiB)
    blob = azurite.container_client(azurite_container).get_blob_client(f"{date}/cleanup/stuck.bin")
    wait_until(lambda: service.status()["processed_err"] >= 1, 30, what="the first cleanup")
    etag = blob.get_blob_properties().etag
    status = wait_until(
        lambda: (s := service.status())["gave_up"] and s, 40, what="the file to be given up"
    )
    assert status["gave_up"][0]["stage"] == "cleanup"
    assert status["gave_up"][0]["stays_at"].endswith("/cleanup/stuck.bin")
    assert blob.get_blob_properties().etag == etag, "the retries uploaded the file again"
    assert scrape(service)["ingestd_files_given_up_total{stage=cleanup}"] == 1
    time.sleep(3)  # no more tries: the log stays as it is
    assert len(error_lines(service, "stuck.bin")) == 3, error_lines(service, "stuck.bin")
    assert (layout.processing / date / "cleanup" / "stuck.bin").exists()
    fuse_mount.clear_faults()
    service.kill_tree()
    service.start()  # the next start takes it from .processing
    service.wait_processed(1, timeout=30)
    assert azurite.blob_md5(azurite_container, f"{date}/cleanup/stuck.bin") == md5
    assert_nothing_left(layout)


@pytest.mark.timeout(90)
def test_an_unreadable_attempts_record_cannot_make_a_poison_file_immortal(
    fuse_mount: FreezableMount,
    make_service,
) -> None:
    layout, service, date = on_mount(fuse_mount, make_service, "record", APP_MAX_ATTEMPTS="3")
    fuse_mount.fail("read", errno.EIO, glob="/.processing/*/record/poison.bin")
    fuse_mount.fail("open", errno.EIO, glob="/.processing/*/record/.attempts/*")
    md5 = write_random(layout.incoming / "poison.bin", 1 * MiB)
    wait_until(lambda: service.status()["quarantined"] == 1, 40, what="the quarantine")
    fuse_mount.clear_faults()
    [kept] = failed_files(layout)
    assert kept.name == "poison.bin" and md5_of(kept) == md5
    assert "EIO" in sidecar(layout, date, "record", "poison.bin")["last_error"]
    assert len(error_lines(service, "poison.bin")) <= 3, error_lines(service, "poison.bin")


@pytest.mark.timeout(90)
def test_a_claim_that_keeps_failing_is_given_up_and_the_file_stays_in_incoming(
    fuse_mount: FreezableMount,
    make_service,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    layout, service, date = on_mount(fuse_mount, make_service, "unclaimable", APP_MAX_ATTEMPTS="3")
    fuse_mount.fail("rename", errno.EIO, glob="/incoming/locked.bin")
    write_random(fuse_mount.backing_path("incoming", "locked.bin"), 1 * MiB)
    status = wait_until(
        lambda: (s := service.status())["gave_up"] and s, 40, what="the claim to be given up"
    )
    assert status["gave_up"][0]["stage"] == "claim"
    assert scrape(service)["ingestd_files_given_up_total{stage=claim}"] == 1
    time.sleep(4)  # many polls: the unchanged file is not offered again
    assert len(error_lines(service, "locked.bin")) == 3, error_lines(service, "locked.bin")
    assert fuse_mount.backing_path("incoming", "locked.bin").exists()
    fuse_mount.clear_faults()
    md5 = write_random(fuse_mount.backing_path("incoming", "locked.bin"), 1 * MiB + 7)  # new
    service.wait_processed(1, timeout=30)
    assert azurite.blob_md5(azurite_container, f"{date}/unclaimable/locked.bin") == md5
    assert_nothing_left(layout)


# 6. Startup sanity


@pytest.mark.timeout(60)
def test_processing_on_another_filesystem_is_one_clear_error_and_no_claim(
    make_service,
    layout: Layout,
) -> None:
    with tmpfs("4m") as elsewhere:
        service = make_service(
            start=False,
            **autostart("sanity"),
            APP_NFS_PROCESSING_ROOT=str(elsewhere / ".processing"),
        )
        write_random(layout.incoming / "waits.bin", 1000)
        service.start(wait=False)
        status = wait_until(
            lambda: _status_or_none(service, "setup_problems"),
            30,
            what="the setup problem in /v1/status",
        )
        assert "one filesystem" in status["setup_problems"][0]
        health = service.http.get("/healthz")
        assert health.status_code == 503 and "one filesystem" in health.json()["reason"]
        assert scrape(service)["ingestd_folders_usable{}"] == 0
        time.sleep(2)
        assert (layout.incoming / "waits.bin").exists(), "nothing is claimed"
        lines = [line for line in service.log_text().splitlines() if "one filesystem" in line]
        assert len(lines) == 1, lines
        service.kill_tree()


@pytest.mark.timeout(60)
def test_unwritable_staging_is_reported_then_picked_up_once_fixed(
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    with tmpfs("8m") as staging:
        subprocess_run(["mount", "-o", "remount,ro", str(staging)])
        service = make_service(
            start=False, **autostart("staging"), APP_LOCAL_STAGING_ROOT=str(staging)
        )
        md5 = write_random(layout.incoming / "later.bin", 5000)
        service.start(wait=False)
        status = wait_until(
            lambda: _status_or_none(service, "setup_problems"),
            30,
            what="the setup problem in /v1/status",
        )
        assert "APP_LOCAL_STAGING_ROOT" in status["setup_problems"][0]
        assert "EROFS" in status["setup_problems"][0]
        assert service.http.get("/healthz").status_code == 503
        subprocess_run(["mount", "-o", "remount,rw", str(staging)])
        service.wait_ready(timeout=40)
        service.wait_processed(1, timeout=30)
        date = service.status()["session"]["date_prefix"]
        assert azurite.blob_md5(azurite_container, f"{date}/staging/later.bin") == md5
        assert service.status()["setup_problems"] == []
        assert service.http.get("/healthz").status_code == 200
        service.kill_tree()


def _status_or_none(service, key: str) -> dict | None:
    try:
        status = service.status()
    except Exception:  # not listening yet
        return None
    return status if status.get(key) else None


def subprocess_run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True)


# 7. Smaller fixes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [errno.EIO, errno.ENOENT], ids=["EIO", "ENOENT"])
def test_a_rename_that_happened_but_reported_an_error_is_recognised(
    error: int,
    fuse_mount: FreezableMount,
    make_service,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """A lost NFS reply: the rename was carried out, the answer to its retransmission fails.

    ENOENT included: only the holder of the file's owner link renames it, so
    a file found at its target after ENOENT was moved by this rename.
    """
    session = f"lost-reply-{errno.errorcode[error].lower()}"
    layout, service, date = on_mount(fuse_mount, make_service, session)
    fuse_mount.fail("rename", error, glob="/incoming/echo.bin", count=1, after=True)
    md5 = write_random(fuse_mount.backing_path("incoming", "echo.bin"), 1 * MiB)
    service.wait_processed(1, timeout=30)
    assert fuse_mount.stats()["faults_injected"]["rename"] == 1
    assert azurite.blob_md5(azurite_container, f"{date}/{session}/echo.bin") == md5
    status = service.status()
    assert status["skipped_gone"] == 0 and status["processed_err"] == 0
    assert_nothing_left(layout)


@pytest.mark.timeout(60)
def test_a_name_that_is_not_utf8_goes_to_failed_at_once(
    make_service,
    layout: Layout,
) -> None:
    service = make_service(**autostart("bytes"), APP_MAX_ATTEMPTS="5")
    date = service.status()["session"]["date_prefix"]
    name = os.fsdecode(b"latin1-\xe9t\xe9.bin")
    raw = os.urandom(1000)
    (layout.incoming / name).write_bytes(raw)
    wait_until(lambda: service.status()["quarantined"] == 1, 30, what="the quarantine")
    [kept] = failed_files(layout)
    assert kept.read_bytes() == raw
    assert "not valid UTF-8" in sidecar(layout, date, "bytes", name)["last_error"]
    assert service.status()["processed_err"] == 1, "no attempt was spent on it"
    assert "Traceback" not in service.log_text()


@pytest.mark.timeout(90)
def test_a_killed_uploaders_staging_copy_is_removed_during_the_run(
    fuse_mount: FreezableMount,
    make_service,
) -> None:
    """The uploader dies mid-copy; its file is then finished elsewhere (it vanishes)."""
    layout, service, date = on_mount(
        fuse_mount, make_service, "leftover", APP_AZURE_MAX_BLOCK_SIZE=str(4 * MiB)
    )
    fuse_mount.freeze("read", glob="/.processing/*/leftover/half.bin", from_offset=8 * MiB)
    write_random(layout.incoming / "half.bin", 16 * MiB)
    fuse_mount.wait_blocked(op="read", timeout=20)
    staged = layout.staging / date / "leftover" / "half.bin"
    assert staged.exists()
    os.kill(uploader_pid(service, "half.bin"), signal.SIGKILL)
    fuse_mount.backing_path(".processing", date, "leftover", "half.bin").unlink()
    fuse_mount.thaw()
    wait_until(lambda: service.status()["skipped_gone"] == 1, 30, what="the retry")
    assert not staged.exists(), "the killed uploader's staging copy is still there"
    assert_nothing_left(layout)


def test_max_stuck_children_0_is_refused_at_startup(layout: Layout) -> None:
    from tests.support.service import base_env

    env = base_env(
        {
            **layout.env(),
            "APP_AZURE_ACCOUNT_URL": "http://127.0.0.1:9/x",
            "APP_AZURE_CONTAINER": "c",
            "APP_MAX_STUCK_CHILDREN": "0",
        }
    )
    result = run_once(env, timeout=30)
    assert result.returncode == 2
    assert "APP_MAX_STUCK_CHILDREN" in result.stderr + result.stdout
