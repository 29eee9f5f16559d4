"""Issue 17: files larger than staging go through a bounded staging window.

A real tmpfs (mounted by the test, CI runs as root) is ``APP_LOCAL_STAGING_ROOT``;
real service, real Azurite, every blob's MD5 checked against its source.

* A file 4x the size of staging arrives whole; small files alongside are
  staged whole, as before, and keep flowing.
* Three such files at once share one staging budget: sampled every 50 ms,
  staging never holds more than the budget; the file that cannot get its
  window yet waits, and is not failed.
* kill -9 of the whole tree mid-window, then a restart: recovery reads the
  file from ``.processing`` again and sends only the blocks storage lacks.

A staging filesystem that is simply full, for small files, is
tests/test_hardening_staging.py (unchanged behaviour).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_all_arrived, assert_nothing_left, metric
from tests.support.faults import MiB, folder_layout, tmpfs
from tests.support.fusefs import FreezableMount
from tests.support.proxy import BlobProxy
from tests.support.service import Layout, wait_until, write_random

STAGING = 32 * MiB
BIG = 4 * STAGING
# 1 MiB blocks, 4 at a time: the default window is 1 MiB x (4 + 2) = 6 MiB.
WINDOWED = {"APP_AZURE_MAX_BLOCK_SIZE": "1MiB", "APP_AZURE_MAX_CONCURRENCY": "4"}
WINDOW = 6 * MiB


@pytest.fixture
def staging() -> Iterator[Path]:
    with tmpfs("32m") as mountpoint:
        yield mountpoint


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class UsageSampler:
    """The staging filesystem's usage, sampled every 50 ms from a thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.peak = 0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="staging-usage")

    def __enter__(self) -> UsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, used_bytes(self.folder))
            self.count += 1


@pytest.mark.timeout(120)
def test_a_file_four_times_staging_arrives_and_small_files_flow_alongside(
    staging: Path, make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    layout = folder_layout(layout.nfs, staging)
    service = make_service(layout_=layout, APP_WORKER_CONCURRENCY="2", **WINDOWED)
    date = service.start_session("window")["date_prefix"]
    expected = {"big.bin": write_random(layout.incoming / "big.bin", BIG)}
    with UsageSampler(staging) as usage:
        windowed = wait_until(
            lambda: service.status()["staging"]["windowed_in_flight"], 30, what="the window"
        )
        expected.update(
            {
                f"small-{i}.bin": write_random(layout.incoming / f"small-{i}.bin", MiB)
                for i in range(6)
            }
        )
        status = service.wait_processed(len(expected), timeout=90)
    assert windowed == [f"{date}/window/big.bin"]
    assert_all_arrived(azurite, azurite_container, f"{date}/window/", expected)
    staging_view = status["staging"]
    assert staging_view["budget_bytes"] == STAGING, "learnt from the scanner's setup check"
    assert staging_view["windowed_total"] == 1 and staging_view["reserved_bytes"] == 0
    assert status["processed_err"] == 0 and status["quarantined"] == 0
    assert usage.count > 0 and usage.peak <= STAGING
    assert "staged through a window of 6291456 bytes" in service.log_text()
    scraped = service.http.get("/metrics").text
    assert metric(scraped, "ingestd_files_windowed_total") == 1
    assert metric(scraped, "ingestd_staging_budget_bytes") == STAGING
    assert_nothing_left(layout)


@pytest.mark.timeout(180)
def test_three_at_once_never_overcommit_the_budget_and_the_third_waits(
    staging: Path, make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """Budget 14 MiB: two 6 MiB windows fit, the third file waits for one of them."""
    budget = 14 * MiB
    layout = folder_layout(layout.nfs, staging)
    service = make_service(
        layout_=layout, APP_WORKER_CONCURRENCY="3", APP_STAGING_BUDGET="14MiB", **WINDOWED
    )
    date = service.start_session("three")["date_prefix"]
    # Written aside, aged, then renamed in together: the scanner finds all three
    # stable at the same poll, so the third is dispatched while two windows are held.
    aside = layout.nfs / "aside"
    aside.mkdir()
    expected = {f"big-{i}.bin": write_random(aside / f"big-{i}.bin", BIG) for i in range(3)}
    for name in expected:
        os.utime(aside / name, (time.time() - 60, time.time() - 60))
    for name in expected:
        os.rename(aside / name, layout.incoming / name)
    reserved, waited = [], []

    def finished() -> dict | None:
        status = service.status()
        reserved.append(status["staging"]["reserved_bytes"])
        waited.append(status["staging"]["waiting_for_space"])
        return status if status["processed_ok"] >= 3 and not status["in_flight"] else None

    with UsageSampler(staging) as usage:
        status = wait_until(finished, 150, interval=0.1, what="three windowed files")
    assert_all_arrived(azurite, azurite_container, f"{date}/three/", expected)
    print(f"\npeak staging use {usage.peak / MiB:.1f} MiB of a {budget // MiB} MiB budget")
    assert usage.count > 0 and usage.peak <= budget, usage.peak
    assert max(reserved) <= budget
    # The third file waited for room (a status poll may miss the moment; the log does not).
    assert any(waited) or "waits for staging space" in service.log_text(), (
        "the third file waits for room in the budget"
    )
    assert status["processed_err"] == 0 and status["quarantined"] == 0, "waiting is no failure"
    assert status["staging"]["windowed_total"] == 3
    assert_nothing_left(layout)


@pytest.mark.timeout(180)
def test_kill_9_mid_window_then_restart_delivers_the_file_sending_only_what_is_missing(
    staging: Path, make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    with BlobProxy(azurite.port) as proxy:
        layout = folder_layout(layout.nfs, staging)
        env = {**proxy.service_env(azurite.account_name), "APP_WORKER_CONCURRENCY": "1"}
        env.update(WINDOWED)
        service = make_service(layout_=layout, **env)
        md5 = write_random(layout.incoming / "big.bin", BIG)
        date = service.start_session("killed")["date_prefix"]
        wait_until(
            lambda: proxy.counts().up_total >= BIG // 2, 60, interval=0.005, what="half sent"
        )
        service.kill_tree()
        proxy.reset_counts()
        second = make_service(layout_=layout, **env)
        status = second.wait_processed(1, timeout=120)
        resent = proxy.counts().up
    print(f"\nafter the restart {resent / MiB:.1f} MiB of {BIG // MiB} MiB went out again")
    assert status["recovered"] == 1
    assert azurite.blob_md5(azurite_container, f"{date}/killed/big.bin") == md5
    assert status["staging"]["windowed_total"] == 1
    # Blocks in flight at the kill (at most a window's worth) are sent again whole.
    assert resent <= BIG // 2 + WINDOW + 2 * MiB, resent
    assert "resumed" in second.log_text()
    assert_nothing_left(layout)


@pytest.mark.timeout(180)
def test_staging_that_cannot_punch_holes_stages_whole_and_loses_nothing(
    tmp_path: Path, make_service, azurite: Azurite, azurite_container: str
) -> None:
    """A staging filesystem without ``fallocate`` (this FUSE mount has none) cannot
    give a window's space back. The setup check finds it and says so; every file
    is then staged whole, so the file over the budget is delivered, not failed
    at its first punched hole."""
    backing = tmp_path / "staging-backing"
    backing.mkdir()
    mount = FreezableMount.start(backing)
    try:
        layout = folder_layout(tmp_path / "share", mount.mountpoint)
        service = make_service(layout_=layout, APP_STAGING_BUDGET="8MiB", **WINDOWED)
        date = service.start_session("no-holes")["date_prefix"]
        expected = {"big.bin": write_random(layout.incoming / "big.bin", 24 * MiB)}
        expected["small.bin"] = write_random(layout.incoming / "small.bin", MiB)
        status = service.wait_processed(2, timeout=120)
        log = service.log_text()
    finally:
        mount.unmount()
    assert_all_arrived(azurite, azurite_container, f"{date}/no-holes/", expected)
    assert "cannot punch holes" in log, log[-2000:]
    assert status["staging"]["windowed_total"] == 0
    assert status["processed_err"] == 0, status["last_error"]
    assert not layout.files_under(layout.failed)
