"""Staging full: a real 32 MiB tmpfs as APP_LOCAL_STAGING_ROOT.

What is right, decided here and in ``Uploader._staging_failure``:

* A file larger than the whole staging filesystem is staged through a window
  (tests/test_staging_window.py). Only when the operator's
  ``APP_STAGING_BUDGET`` claims more than the disk holds is it staged whole,
  and then it can never be: its failures count; after ``APP_MAX_ATTEMPTS``
  it moves to ``.failed`` with a sidecar that gives both sizes. Until then
  it stays claimed in ``.processing``.
* A file that would fit an empty staging disk but finds it full (other uploads
  hold the space, or an operator's leftovers) is not a poison file: the
  failure is not counted, the file stays in ``.processing`` and is retried
  with the outage backoff until space frees up, whatever ``APP_MAX_ATTEMPTS``.
* Either way the partial staging copy is removed at once and ``last_error``
  says "staging" and "ENOSPC"; small files keep flowing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_all_arrived, assert_nothing_left, failed_files, sidecar
from tests.support.faults import MiB, folder_layout, tmpfs
from tests.support.service import Layout, md5_of, wait_until, write_random


@pytest.fixture
def small_staging() -> Iterator[Path]:
    with tmpfs("32m") as mountpoint:
        yield mountpoint


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.timeout(60)
def test_file_larger_than_staging_fails_clearly_and_ends_in_failed(
    small_staging: Path,
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    layout = folder_layout(layout.nfs, small_staging)
    # A budget beyond the disk: the file fits it, so it is staged whole, as before windows.
    service = make_service(
        layout_=layout, APP_MAX_ATTEMPTS="2", APP_WORKER_CONCURRENCY="2", APP_STAGING_BUDGET="1GiB"
    )
    date = service.start_session("full")["date_prefix"]
    big_md5 = write_random(layout.incoming / "huge.bin", 40 * MiB)
    small = {
        f"small-{i}.bin": write_random(layout.incoming / f"small-{i}.bin", MiB) for i in range(5)
    }

    def first_failure() -> dict | None:
        status = service.status()
        error = status["last_error"] or ""
        return status if "huge.bin" in error else None

    status = wait_until(first_failure, 30, interval=0.05, what="the staging failure")
    assert "staging" in status["last_error"] and "ENOSPC" in status["last_error"], status
    assert "larger than the whole staging filesystem" in status["last_error"]
    assert (layout.processing / date / "full" / "huge.bin").exists(), (
        "the claimed file stays in .processing until it is quarantined"
    )
    assert not (layout.staging / date / "full" / "huge.bin").exists(), (
        "the partial staging copy must be removed"
    )

    wait_until(lambda: service.status()["quarantined"] == 1, 30, what="the quarantine")
    service.wait_processed(len(small), timeout=30)
    assert_all_arrived(azurite, azurite_container, f"{date}/full/", small)
    assert failed_files(layout) == [layout.failed / date / "full" / "huge.bin"]
    assert md5_of(layout.failed / date / "full" / "huge.bin") == big_md5
    record = sidecar(layout, date, "full", "huge.bin")
    assert record["attempts"] == 2
    assert "ENOSPC" in record["last_error"] and "staging" in record["last_error"]
    assert str(40 * MiB) in record["last_error"], record
    assert_nothing_left(layout)
    assert used_bytes(small_staging) < MiB


@pytest.mark.timeout(60)
def test_staging_full_for_now_is_retried_without_counting(
    small_staging: Path,
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    # 24 MiB of someone else's data: a 16 MiB file fits the disk, not what is left of it.
    filler = small_staging / "operator-leftover.bin"
    write_random(filler, 24 * MiB)
    layout = folder_layout(layout.nfs, small_staging)
    service = make_service(layout_=layout, APP_MAX_ATTEMPTS="1")
    date = service.start_session("later")["date_prefix"]
    md5 = write_random(layout.incoming / "fits-later.bin", 16 * MiB)

    # With APP_MAX_ATTEMPTS=1 a single counted failure would quarantine it.
    status = wait_until(
        lambda: (s := service.status())["processed_err"] >= 2 and s, 30, what="two failed attempts"
    )
    assert "staging is full" in status["last_error"] and "ENOSPC" in status["last_error"]
    assert status["quarantined"] == 0
    assert failed_files(layout) == []
    assert (layout.processing / date / "later" / "fits-later.bin").exists()
    assert not (layout.staging / date / "later" / "fits-later.bin").exists()
    assert not (layout.processing / date / "later" / ".attempts" / "fits-later.bin").exists(), (
        "a full staging disk must not count against the file"
    )

    filler.unlink()
    service.wait_processed(1, timeout=30)
    assert_all_arrived(azurite, azurite_container, f"{date}/later/", {"fits-later.bin": md5})
    assert_nothing_left(layout)
