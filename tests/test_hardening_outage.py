"""Blob endpoint down: a persistent Azurite stopped mid-upload and started again.

An unreachable endpoint is an outage, not a poison file: every failed
attempt is reported (``processed_err``, ``last_error``) and retried with the
supervisor's outage backoff, but never counted. The check uses
``APP_MAX_ATTEMPTS=1``, the strictest setting (a single counted failure
would quarantine at once), and waits until one file has failed twice and
another once: neither may reach ``.failed``. Nothing is deleted early:
while Azurite is down every file dropped in is still in incoming or
``.processing``. After the restart on the same port every file, those
uploaded before the outage included, is there with its exact bytes.

Timing: a failed attempt costs the SDK's own retries (connection refused:
two retries after 4 and 6 s with the default stall timeout, see the
README's Timeouts), plus the outage backoff (2, 4, 8 s...). That is why the
check is two failures at APP_MAX_ATTEMPTS=1 rather than three at 2.
"""

from __future__ import annotations

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_all_arrived, assert_nothing_left, failed_files
from tests.support.faults import MiB
from tests.support.service import Layout, azurite_env, wait_until, write_random

CONTAINER = "outage"


def failures_logged(service, blob: str) -> int:
    """Failed attempts the uploader logged for one blob ("<blob> failed at upload")."""
    return service.log_text().count(f"{blob} failed at upload")


@pytest.mark.timeout(150)
def test_outage_mid_batch_is_retried_never_counted_and_loses_nothing(
    make_service,
    layout: Layout,
    azurite_factory,
) -> None:
    storage: Azurite = azurite_factory(persistent=True)
    storage.create_container(CONTAINER)
    service = make_service(
        **azurite_env(storage, CONTAINER),
        APP_MAX_ATTEMPTS="1",
        APP_WORKER_CONCURRENCY="2",
        APP_AZURE_MAX_CONCURRENCY="1",
        APP_AZURE_MAX_BLOCK_SIZE="1MiB",
        # Shorter network bounds (they derive from it: connect 1.3 s, read 3 s):
        # the same retries, in a fraction of the default's time.
        APP_CHILD_STALL_TIMEOUT_S="8",
    )
    date = service.start_session("outage")["date_prefix"]
    prefix = f"{date}/outage/"
    claimed_dir = layout.processing / date / "outage"
    expected = {
        f"before-{i}.bin": write_random(layout.incoming / f"before-{i}.bin", MiB) for i in range(3)
    }
    service.wait_processed(3, timeout=30)

    expected["mid.bin"] = write_random(layout.incoming / "mid.bin", 64 * MiB)

    def mid_upload() -> bool:
        return any(
            f["file"] == "mid.bin"
            and f["stage"] == "uploading"
            and 0 < f["bytes_done"] < f["bytes_total"]
            for f in service.status()["in_flight"]
        )

    wait_until(mid_upload, 30, interval=0.01, what="mid.bin to be mid-upload")
    storage.stop()
    assert not storage.running
    expected["during.bin"] = write_random(layout.incoming / "during.bin", MiB)

    def still_on_nfs() -> None:
        """Nothing is deleted before its upload: each file is in incoming or claimed."""
        for name in ("mid.bin", "during.bin"):
            assert (layout.incoming / name).exists() or (claimed_dir / name).exists(), name
        assert failed_files(layout) == []

    def retried_past_the_limit() -> bool:
        still_on_nfs()
        return (
            failures_logged(service, prefix + "during.bin") >= 2
            and failures_logged(service, prefix + "mid.bin") >= 1
        )

    wait_until(
        retried_past_the_limit,
        100,
        interval=0.25,
        what="during.bin failed twice and mid.bin once (APP_MAX_ATTEMPTS=1)",
    )
    status = service.status()
    assert status["quarantined"] == 0
    assert status["processed_err"] >= 3
    assert "cannot reach the blob endpoint" in status["last_error"], status["last_error"]
    assert not (claimed_dir / ".attempts").exists() or not any(
        (claimed_dir / ".attempts").iterdir()
    ), "an outage must not count"

    # One more file while the endpoint is still down: waiting or claimed, never lost.
    expected["late.bin"] = write_random(layout.incoming / "late.bin", MiB)
    still_on_nfs()
    assert (layout.incoming / "late.bin").exists() or (claimed_dir / "late.bin").exists()

    storage.start()
    service.wait_processed(len(expected), timeout=60)
    assert_all_arrived(storage, CONTAINER, prefix, expected)
    assert storage.blob_names(CONTAINER) == sorted(prefix + n for n in expected)
    assert_nothing_left(layout)
    assert failed_files(layout) == []
    status = service.status()
    assert status["quarantined"] == 0
    assert status["processed_ok"] == len(expected)
    print(
        f"\noutage: failed attempts mid.bin {failures_logged(service, prefix + 'mid.bin')}, "
        f"during.bin {failures_logged(service, prefix + 'during.bin')}; processed_err "
        f"{status['processed_err']}, uploader kills {status['kills']}"
    )


@pytest.mark.timeout(90)
def test_an_uploader_waiting_on_a_stopped_endpoint_is_not_killed_and_loses_nothing(
    make_service,
    layout: Layout,
    azurite_factory,
) -> None:
    """Issue 13: an uploader waiting on the blob endpoint beats while it waits
    (the SDK's retries included), so even with a stall timeout far shorter
    than an attempt it is never killed: an outage is shown, not "cured" by
    killing children. Its file stays claimed and arrives once the endpoint
    is back. (Before issue 13 it was SIGKILLed every 3 s here.)"""
    storage: Azurite = azurite_factory(persistent=True)
    storage.create_container(CONTAINER)
    service = make_service(
        **azurite_env(storage, CONTAINER),
        APP_MAX_ATTEMPTS="1",
        APP_WORKER_CONCURRENCY="1",
        APP_CHILD_STALL_TIMEOUT_S="3",
    )
    date = service.start_session("stalled")["date_prefix"]
    claimed = layout.processing / date / "stalled" / "victim.bin"
    storage.stop()
    md5 = write_random(layout.incoming / "victim.bin", 2 * MiB)

    def failed_twice() -> bool:
        assert (layout.incoming / "victim.bin").exists() or claimed.exists()
        return failures_logged(service, f"{date}/stalled/victim.bin") >= 2

    wait_until(failed_twice, 60, interval=0.25, what="two failed attempts")
    status = service.status()
    assert status["kills"] == {} and status["restarts"] == {}, status["kills"]
    assert status["storage"]["state"] == "unreachable", status["storage"]
    assert claimed.exists() and failed_files(layout) == []
    storage.start()
    status = service.wait_processed(1, timeout=40)
    assert status["quarantined"] == 0 and status["kills"] == {}
    assert_all_arrived(storage, CONTAINER, f"{date}/stalled/", {"victim.bin": md5})
    assert_nothing_left(layout)
