"""Several replicas on one share: two, then three ingestd instances.

All replicas watch the same incoming, ``.processing`` and container, each
with its own port and staging folder (its own pod disk), and all use the
same session name, so the blob names and claimed paths collide exactly as
they would in production when a Deployment is scaled out. 50 files dropped
at once must all arrive with their exact bytes; no replica may crash or
report an error for a race it lost: a file another replica took or finished
first is a benign skip (``skipped_gone``), not ``processed_err``.

The duplicate-upload count (uploads summed over replicas, minus the files)
is printed and must be zero: the rename claim is the lock (PRD FR-3).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.azurite import Azurite
from tests.support.faults import MiB, assert_all_arrived, assert_nothing_left, folder_layout
from tests.support.service import Layout, wait_until, write_random

FILES = 50


def size_of(index: int) -> int:
    """Mostly small files; every tenth goes as several blocks (over the 4 MiB single put)."""
    return 6 * MiB + index if index % 10 == 3 else 64 * 1024 * (1 + index % 8)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_share_the_work_without_loss_errors_or_crashes(
    replicas: int, make_service, layout: Layout, tmp_path: Path, azurite: Azurite,
    azurite_container: str,
) -> None:
    session = f"replicas-{replicas}"
    services = []
    for index in range(replicas):
        own = folder_layout(layout.nfs, tmp_path / f"staging-{index}")
        services.append(make_service(layout_=own, APP_AUTOSTART="true",
                                     APP_AUTOSTART_SESSION=session,
                                     APP_WORKER_CONCURRENCY="2"))
    date = services[0].status()["session"]["date_prefix"]
    assert all(s.status()["session"]["date_prefix"] == date for s in services)
    prefix = f"{date}/{session}/"

    started = time.monotonic()
    expected = {f"file-{i:02d}.bin": write_random(layout.incoming / f"file-{i:02d}.bin",
                                                  size_of(i)) for i in range(FILES)}

    def all_done() -> list[dict] | None:
        statuses = [s.status() for s in services]
        idle = all(not st["in_flight"] and st["queue"]["depth"] == 0 for st in statuses)
        uploaded = len(azurite.blob_names(azurite_container, prefix=prefix)) == FILES
        empty = not layout.files_under(layout.incoming) and \
            not layout.files_under(layout.processing)
        return statuses if idle and uploaded and empty else None

    statuses = wait_until(all_done, 90, interval=0.3, what=f"{FILES} files through "
                                                             f"{replicas} replicas")
    seconds = time.monotonic() - started
    assert_all_arrived(azurite, azurite_container, prefix, expected)
    for index, service in enumerate(services):
        assert service.proc is not None and service.proc.poll() is None, f"replica {index} died"
        assert all(c["restarts"] == 0 for c in statuses[index]["children"]), \
            statuses[index]["children"]
        assert statuses[index]["processed_err"] == 0, statuses[index]["last_error"]
        assert statuses[index]["quarantined"] == 0
    for index in range(replicas):
        own = folder_layout(layout.nfs, tmp_path / f"staging-{index}")
        assert_nothing_left(own)

    uploads = [st["processed_ok"] for st in statuses]
    skipped = [st["skipped_gone"] for st in statuses]
    duplicates = sum(uploads) - FILES
    print(f"\n{replicas} replicas, {FILES} files in {seconds:.1f} s: uploads per replica "
          f"{uploads}, skipped_gone {skipped}, duplicate uploads {duplicates}")
    # The rename is the lock: a replica that loses it skips the file (skipped_gone).
    assert duplicates == 0, f"{duplicates} files uploaded by more than one replica"
    assert all(n > 0 for n in uploads), "every replica should have taken some work"
