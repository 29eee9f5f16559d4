"""Blob endpoint down: a persistent Azurite stopped mid-upload and started again.

An unreachable endpoint is an outage, not a poison file: every failed
attempt is reported (``processed_err``, ``last_error``) and retried with the
supervisor's outage backoff, but never counted, so with ``APP_MAX_ATTEMPTS=2``
a file that failed three times during the outage must still be in
``.processing`` and not in ``.failed``. Nothing is deleted early: while
Azurite is down every file dropped in is still in incoming or ``.processing``.
After the restart on the same port every file arrives with its exact bytes.

Timing: each failed attempt costs about 15 s of the SDK's own retries
(connection refused, three retries with backoff and jitter) before the
supervisor sees it, plus the outage backoff (2, 4, 8 s). So the outage is
kept to one file in flight and one uploader; anything more multiplies it.
"""

from __future__ import annotations

import pytest

from tests.support.azurite import Azurite
from tests.support.faults import (
    MiB,
    assert_all_arrived,
    assert_nothing_left,
    azurite_settings,
    failed_files,
)
from tests.support.service import Layout, wait_until, write_random

CONTAINER = "outage"


def failures_logged(service, blob: str) -> int:
    """Failed attempts the uploader logged for one blob ("<blob> failed at upload")."""
    return service.log_text().count(f"{blob} failed at upload")


@pytest.mark.timeout(150)
def test_outage_mid_batch_is_retried_never_counted_and_loses_nothing(
    make_service, layout: Layout, azurite_factory,
) -> None:
    storage: Azurite = azurite_factory(persistent=True)
    storage.create_container(CONTAINER)
    service = make_service(**azurite_settings(storage, CONTAINER), APP_MAX_ATTEMPTS="2",
                           APP_WORKER_CONCURRENCY="1", APP_AZURE_MAX_CONCURRENCY="1",
                           APP_AZURE_MAX_BLOCK_SIZE="1MiB")
    date = service.start_session("outage")["date_prefix"]
    prefix = f"{date}/outage/"
    claimed_dir = layout.processing / date / "outage"
    expected = {f"before-{i}.bin": write_random(layout.incoming / f"before-{i}.bin", MiB)
                for i in range(3)}
    service.wait_processed(3, timeout=30)

    expected["mid.bin"] = write_random(layout.incoming / "mid.bin", 64 * MiB)

    def mid_upload() -> bool:
        return any(f["file"] == "mid.bin" and f["stage"] == "uploading"
                   and 0 < f["bytes_done"] < f["bytes_total"]
                   for f in service.status()["in_flight"])

    wait_until(mid_upload, 30, interval=0.01, what="mid.bin to be mid-upload")
    storage.stop()
    assert not storage.running

    def still_on_nfs(names) -> None:
        """Nothing is deleted before its upload: each file is in incoming or claimed."""
        for name in names:
            assert (layout.incoming / name).exists() or (claimed_dir / name).exists(), name
        assert failed_files(layout) == []

    def third_failure() -> bool:
        still_on_nfs(["mid.bin"])
        return failures_logged(service, prefix + "mid.bin") >= 3

    wait_until(third_failure, 90, interval=0.25,
               what="three failed attempts of mid.bin (more than APP_MAX_ATTEMPTS=2)")
    status = service.status()
    assert status["quarantined"] == 0
    assert status["processed_err"] >= 3
    assert "mid.bin" in status["last_error"]
    assert "cannot reach the blob endpoint" in status["last_error"], status["last_error"]
    assert not (claimed_dir / ".attempts" / "mid.bin").exists(), "an outage must not count"

    # More files arrive while the endpoint is still down: claimed or waiting, never lost.
    during = {f"during-{i}.bin": write_random(layout.incoming / f"during-{i}.bin", 2 * MiB)
              for i in range(2)}
    expected.update(during)
    wait_until(lambda: any((claimed_dir / n).exists() for n in during), 15, interval=0.05,
               what="a file claimed during the outage")
    still_on_nfs([*during, "mid.bin"])

    storage.start()
    service.wait_processed(len(expected), timeout=60)
    assert_all_arrived(storage, CONTAINER, prefix, expected)
    assert sorted(storage.blob_names(CONTAINER)) == sorted(prefix + n for n in expected)
    assert_nothing_left(layout)
    assert failed_files(layout) == []
    status = service.status()
    assert status["quarantined"] == 0
    assert status["processed_ok"] == len(expected)
    print(f"\noutage: {failures_logged(service, prefix + 'mid.bin')} failed attempts of "
          f"mid.bin, processed_err {status['processed_err']}, "
          f"uploader kills {status['kills']}")
