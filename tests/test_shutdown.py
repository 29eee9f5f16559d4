"""Graceful shutdown on SIGTERM: drain, keep answering, exit 0, lose nothing.

Kubernetes sends SIGTERM on every rollout and node drain. The service must
stop taking work at once (/readyz 503), let in-flight uploads finish within
``APP_SHUTDOWN_GRACE_S``, and leave anything unfinished in ``.processing``.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.azurite import Azurite
from tests.support.service import Layout, md5_of, wait_until, write_random

MiB = 1024 * 1024


def uploading(service) -> bool:
    return any(
        f["stage"] == "uploading" and f["bytes_done"] > 0 for f in service.status()["in_flight"]
    )


@pytest.mark.timeout(180)
def test_sigterm_lets_the_upload_in_flight_finish_then_exits_0(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    service = make_service(APP_SHUTDOWN_GRACE_S="60", APP_AZURE_MAX_CONCURRENCY="1")
    session = service.start_session("drain")
    md5 = write_random(layout.incoming / "inflight.bin", 256 * MiB)
    wait_until(lambda: uploading(service), 60, interval=0.05, what="the upload to start")

    service.terminate()
    signalled = time.monotonic()
    ready = wait_until(
        lambda: service.http.get("/readyz").status_code == 503,
        5,
        interval=0.02,
        what="/readyz to turn 503",
    )
    assert ready
    print(f"\n/readyz turned 503 {1000 * (time.monotonic() - signalled):.0f} ms after SIGTERM")
    assert service.http.get("/healthz").status_code == 200
    write_random(layout.incoming / "late.bin", MiB)  # must not be taken while draining

    assert service.wait_exit(timeout=90) == 0
    blob = f"{session['date_prefix']}/drain/inflight.bin"
    assert azurite.blob_md5(azurite_container, blob) == md5
    assert layout.files_under(layout.processing) == []
    assert (layout.incoming / "late.bin").exists()
    wait_until(lambda: not service.survivors(), 10, what="no process left")


@pytest.mark.timeout(240)
def test_sigterm_past_the_grace_period_leaves_the_file_for_the_next_start(
    fuse_mount, make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """The upload is held mid-way (reads of the staging copy frozen), so the grace
    period surely expires with the file in flight."""
    grace = 2.0
    staging = fuse_mount.mountpoint / "staging"
    fuse_mount.backing_path("staging").mkdir()
    service = make_service(APP_SHUTDOWN_GRACE_S=str(grace), APP_LOCAL_STAGING_ROOT=str(staging))
    session = service.start_session("cut short")
    fuse_mount.freeze(["read"], glob="/staging/*", from_offset=16 * MiB)
    md5 = write_random(layout.incoming / "long.bin", 64 * MiB)
    fuse_mount.wait_blocked(1, op="read", timeout=60)
    assert service.status()["in_flight"], "the upload is in flight"

    service.terminate()
    started = time.monotonic()
    code = service.wait_exit(timeout=grace + 30)
    took = time.monotonic() - started
    print(f"\nexited {code} {took:.1f} s after SIGTERM (grace {grace} s)")
    assert code == 0
    assert took < grace + 10
    wait_until(lambda: not service.survivors(), 10, what="no process left")
    claimed = layout.processing / session["date_prefix"] / "cut%20short" / "long.bin"
    assert claimed.exists() and md5_of(claimed) == md5
    blob = f"{session['date_prefix']}/cut%20short/long.bin"
    # A narrow prefix: other tests store names (control characters) that make
    # Azurite's List Blobs fail for a listing that includes them.
    assert azurite.blob_names(azurite_container, prefix=blob) == []

    fuse_mount.thaw()
    restarted = make_service(APP_LOCAL_STAGING_ROOT=str(staging))
    restarted.wait_processed(1, timeout=120)
    assert azurite.blob_md5(azurite_container, blob) == md5
    assert layout.files_under(layout.processing) == []
    assert layout.files_under(fuse_mount.backing_path("staging")) == []


@pytest.mark.timeout(60)
def test_sigterm_when_idle_exits_0_promptly(make_service) -> None:
    service = make_service()
    service.terminate()
    assert service.wait_exit(timeout=15) == 0
    with pytest.raises(httpx.HTTPError):
        service.http.get("/healthz", timeout=1)
