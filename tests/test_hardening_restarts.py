"""Restart loop: 12 restarts in a row while files keep arriving.

A writer drops a file every 0.1-0.3 s (64 KiB to 6 MiB, the largest going
as several blocks) for the whole run. Meanwhile the service is started and stopped 20
times: ``kill -9`` of the whole process group (sometimes before it is even
ready), or SIGTERM (drain with a short grace, exit 0). The sequence is
seeded, so a failure replays the same way. At the end one last start must
upload every file with its exact bytes, as exactly one blob each, and leave
incoming, ``.processing`` (bookkeeping included), staging and ``.failed`` empty.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_all_arrived, assert_nothing_left, failed_files
from tests.support.faults import MiB
from tests.support.service import Layout, Service, wait_until, write_random

RESTARTS = 12
SEED = 20261129


class Writer(threading.Thread):
    """Drops files into incoming until stopped; remembers each one's MD5."""

    def __init__(self, layout: Layout, rng: random.Random) -> None:
        super().__init__(name="writer", daemon=True)
        self.layout, self.rng = layout, rng
        self.expected: dict[str, str] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                name = f"f-{len(self.expected):04d}.bin"
                size = self.rng.choice([64 * 1024, 256 * 1024, MiB, 6 * MiB])
                self.expected[name] = write_random(self.layout.incoming / name, size)
                self.stop.wait(self.rng.uniform(0.1, 0.3))
        except BaseException as exc:  # surfaced by the test, not lost in a thread
            self.error = exc


def stop_once(service: Service, rng: random.Random, round_: int) -> str:
    """Run a moment, then end the service one way or another; say how."""
    if round_ % 5 == 4:  # killed while starting: recovery and staging cleanup cut short
        service.start(wait=False)
        time.sleep(rng.uniform(0.2, 1.2))
        service.kill_tree()
        return "kill -9 while starting"
    service.start()
    time.sleep(rng.uniform(0.3, 1.2))
    if round_ % 2:
        service.terminate()
        code = service.wait_exit(timeout=30)
        assert code == 0, f"SIGTERM exit code {code}:\n{service.log_text()[-3000:]}"
        return "SIGTERM"
    service.kill_tree()
    return "kill -9"


@pytest.mark.timeout(150)
def test_restarts_while_files_flow_lose_nothing(
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    rng = random.Random(SEED)
    service = make_service(
        start=False,
        APP_AUTOSTART="true",
        APP_AUTOSTART_SESSION="restarts",
        APP_SHUTDOWN_GRACE_S="3",
        APP_WORKER_CONCURRENCY="2",
        APP_AZURE_MAX_BLOCK_SIZE="1MiB",
        APP_POLL_INTERVAL_S="0.2",
        APP_MIN_FILE_AGE_S="0.3",
    )
    writer = Writer(layout, rng)
    started = time.monotonic()
    writer.start()
    ways = []
    try:
        for round_ in range(RESTARTS):
            ways.append(stop_once(service, rng, round_))
            wait_until(lambda: not service.survivors(), 10, what="the old tree to be gone")
    finally:
        writer.stop.set()
        writer.join(timeout=10)
    assert writer.error is None, writer.error
    expected = writer.expected

    service.start()
    date = service.status()["session"]["date_prefix"]
    prefix = f"{date}/restarts/"

    def drained() -> bool:
        status = service.status()
        return (
            not status["in_flight"]
            and status["queue"]["depth"] == 0
            and not layout.files_under(layout.incoming)
            and not layout.files_under(layout.processing)
        )

    wait_until(drained, 60, interval=0.3, what="every file through")
    seconds = time.monotonic() - started
    assert_all_arrived(azurite, azurite_container, prefix, expected)
    blobs = azurite.blob_names(azurite_container, prefix=prefix)
    assert blobs == sorted(prefix + name for name in expected), "exactly one blob per file"
    assert failed_files(layout) == []
    assert_nothing_left(layout)
    status = service.status()
    assert status["quarantined"] == 0
    print(
        f"\n{RESTARTS} restarts ({ways.count('kill -9')} kill -9, {ways.count('SIGTERM')} "
        f"SIGTERM, {ways.count('kill -9 while starting')} kill -9 while starting), "
        f"{len(expected)} files, {len(blobs)} blobs, {seconds:.1f} s, "
        f"{status['recovered']} recovered by the last start"
    )
