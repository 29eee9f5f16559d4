"""Several replicas on one share: two, then three ingestd instances.

All replicas watch the same incoming, ``.processing`` and container, each
with its own port, staging folder (its own pod disk) and replica name (its
pod name: ``APP_REPLICA_ID``, since they share this host's name), and all
use the same session name, so the blob names and claimed paths collide exactly as
they would in production when a Deployment is scaled out. 50 files dropped
at once must all arrive with their exact bytes; no replica may crash or
report an error for a race it lost: a file another replica took or finished
first is a benign skip (``skipped_gone``), not ``processed_err``.

The duplicate-upload count (uploads summed over replicas, minus the files)
is printed and must be zero: the claim's owner link, taken before the
rename, is the lock (ingestd.leases).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_all_arrived, assert_nothing_left
from tests.support.faults import MiB, folder_layout
from tests.support.service import Layout, wait_until, write_random

FILES = 50


def size_of(index: int) -> int:
    """Mostly small files; every tenth goes as several blocks (over the 4 MiB single put)."""
    return 6 * MiB + index if index % 10 == 3 else 64 * 1024 * (1 + index % 8)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_share_the_work_without_loss_errors_or_crashes(
    replicas: int,
    make_service,
    layout: Layout,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    session = f"replicas-{replicas}"
    services = []
    for index in range(replicas):
        own = folder_layout(layout.nfs, tmp_path / f"staging-{index}")
        services.append(
            make_service(
                layout_=own,
                APP_AUTOSTART="true",
                APP_AUTOSTART_SESSION=session,
                APP_REPLICA_ID=f"replica-{index}",
                APP_WORKER_CONCURRENCY="2",
            )
        )
    date = services[0].status()["session"]["date_prefix"]
    assert all(s.status()["session"]["date_prefix"] == date for s in services)
    prefix = f"{date}/{session}/"

    started = time.monotonic()
    expected = {
        f"file-{i:02d}.bin": write_random(layout.incoming / f"file-{i:02d}.bin", size_of(i))
        for i in range(FILES)
    }

    def all_done() -> list[dict] | None:
        statuses = [s.status() for s in services]
        idle = all(not st["in_flight"] and st["queue"]["depth"] == 0 for st in statuses)
        uploaded = len(azurite.blob_names(azurite_container, prefix=prefix)) == FILES
        empty = not layout.files_under(layout.incoming) and not layout.files_under(
            layout.processing
        )
        return statuses if idle and uploaded and empty else None

    statuses = wait_until(
        all_done, 90, interval=0.3, what=f"{FILES} files through {replicas} replicas"
    )
    seconds = time.monotonic() - started
    assert_all_arrived(azurite, azurite_container, prefix, expected)
    for index, service in enumerate(services):
        assert service.proc is not None and service.proc.poll() is None, f"replica {index} died"
        assert all(c["restarts"] == 0 for c in statuses[index]["children"]), statuses[index][
            "children"
        ]
        assert statuses[index]["processed_err"] == 0, statuses[index]["last_error"]
        assert statuses[index]["quarantined"] == 0
    for index in range(replicas):
        own = folder_layout(layout.nfs, tmp_path / f"staging-{index}")
        assert_nothing_left(own)

    uploads = [st["processed_ok"] for st in statuses]
    skipped = [st["skipped_gone"] for st in statuses]
    duplicates = sum(uploads) - FILES
    print(
        f"\n{replicas} replicas, {FILES} files in {seconds:.1f} s: uploads per replica "
        f"{uploads}, skipped_gone {skipped}, duplicate uploads {duplicates}"
    )
    # The owner link is the lock: a replica that loses it skips the file (skipped_gone).
    assert duplicates == 0, f"{duplicates} files uploaded by more than one replica"
    assert all(n > 0 for n in uploads), "every replica should have taken some work"


LEASE_S = 12.0


@pytest.mark.timeout(90)
def test_replica_starting_while_another_uploads_leaves_its_file_alone(
    make_service,
    layout: Layout,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """Scale-out or a rolling update: a new replica's recovery finds a file another
    replica is uploading right now. Before leases it uploaded that file too; now the
    file's owner link names a replica whose lease is renewed, so it is left alone,
    however long the upload takes, and the file is uploaded once.

    Replica A uploads one 8 MiB file under a 0.4 MB/s cap (about 21 s: it keeps
    beating while it waits for its budget). B starts once A has claimed it and
    watches for longer than the lease timeout plus two recovery passes (one every
    1.2 s): it must take nothing.
    """
    settings = {
        "APP_AUTOSTART": "true",
        "APP_AUTOSTART_SESSION": "overlap",
        "APP_AZURE_MAX_BLOCK_SIZE": "1MiB",
        "APP_AZURE_MAX_CONCURRENCY": "1",
        "APP_WORKER_CONCURRENCY": "1",
        "APP_LEASE_TIMEOUT_S": str(LEASE_S),
        "APP_CHILD_STALL_TIMEOUT_S": "8",
    }
    staging_a = folder_layout(layout.nfs, tmp_path / "staging-a")
    staging_b = folder_layout(layout.nfs, tmp_path / "staging-b")
    first = make_service(
        layout_=staging_a, APP_REPLICA_ID="replica-a", APP_AZURE_MAX_MBPS="0.4", **settings
    )
    date = first.status()["session"]["date_prefix"]
    blob = f"{date}/overlap/big.bin"
    md5 = write_random(layout.incoming / "big.bin", 8 * MiB)
    link = layout.processing / date / "overlap" / ".owner" / "big.bin"
    wait_until(lambda: link.is_symlink(), 20, what="A's claim")
    assert os.readlink(link).startswith("replica-a~"), os.readlink(link)

    second = make_service(layout_=staging_b, APP_REPLICA_ID="replica-b", **settings)
    watched = time.monotonic()
    first.wait_processed(1, timeout=60)
    watched = time.monotonic() - watched
    statuses = [first.status(), second.status()]
    assert watched > LEASE_S * 1.2 + 2, f"B watched only {watched:.1f} s: the test proves nothing"
    assert statuses[1]["recovered"] == 0, "B took a file A was uploading"
    assert [s["processed_ok"] for s in statuses] == [1, 0], statuses
    assert [s["processed_err"] for s in statuses] == [0, 0], statuses[0]["last_error"]
    assert azurite.blob_md5(azurite_container, blob) == md5
    assert azurite.blob_names(azurite_container, prefix=f"{date}/overlap/") == [blob]
    assert_nothing_left(staging_a)
    assert_nothing_left(staging_b)
    print(
        f"\noverlap: B watched A's upload for {watched:.1f} s (lease timeout {LEASE_S} s); "
        f"uploads {[s['processed_ok'] for s in statuses]}, recovered by B "
        f"{statuses[1]['recovered']}"
    )


@pytest.mark.timeout(10)
def test_claim_rules_the_owner_link_is_the_lock(tmp_path: Path) -> None:
    """The claim's decisions, on plain folders (no service): who may take a file.

    Two replicas' tokens, A and B. The owner link is taken before the rename,
    so of two replicas only the one holding it renames, and a claimed file is
    continued only by the replica its link names.
    """
    from ingestd.config import Settings
    from ingestd.filesteps import Paths, claim
    from ingestd.messages import Job

    a, b = "replica-a~0000000a", "replica-b~0000000b"
    layout = folder_layout(tmp_path / "nfs", tmp_path / "staging")
    settings = Settings(
        azure_account_url="http://127.0.0.1:1/x",
        azure_container="c",
        **{k[4:].lower(): v for k, v in layout.env().items()},
    )
    paths = Paths.of(settings, Job("f.bin", "20260101", "s"))
    paths.claimed.parent.mkdir(parents=True)

    def incoming(data: bytes) -> tuple[int, int]:
        paths.incoming.write_bytes(data)
        st = paths.incoming.stat()
        return st.st_size, st.st_mtime_ns

    def new(seen: tuple[int, int]) -> Job:
        return Job("f.bin", "20260101", "s", seen=seen)

    def owner() -> str | None:
        return os.readlink(paths.owner) if paths.owner.is_symlink() else None

    ours = Job("f.bin", "20260101", "s", claimed=True)
    seen = incoming(b"one")
    assert claim(paths, new(seen), a) and paths.claimed.read_bytes() == b"one"
    assert owner() == a, "the claim records its owner"
    assert not claim(paths, new(seen), b), "lost the rename: another replica's"
    assert not claim(paths, new(seen), a), "claimed already, nothing in incoming"
    assert claim(paths, ours, a), "our own claim (recovered, reported) is continued"
    assert not claim(paths, ours, b), "a claimed file is continued only by its owner"
    seen = incoming(b"two")
    assert claim(paths, new(seen), a), "an older claimed copy is finished first"
    assert not claim(paths, new(seen), b), "... by its owner only"
    assert paths.claimed.read_bytes() == b"one" and paths.incoming.read_bytes() == b"two"
    paths.claimed.unlink()
    paths.owner.unlink()  # what cleanup does
    incoming(b"two, then rewritten")
    assert not claim(paths, new(seen), a), "changed since found stable: not yet"
    assert paths.incoming.exists() and not paths.claimed.exists() and owner() is None
    seen = incoming(b"three")
    os.symlink(b, paths.owner)  # B is between its link and its rename
    assert not claim(paths, new(seen), a), "B holds the link: only B may rename"
    assert paths.incoming.exists() and owner() == b
    assert claim(paths, new(seen), b) and paths.claimed.read_bytes() == b"three"
    paths.claimed.unlink()
    paths.owner.unlink()
    seen = incoming(b"four")
    paths.incoming.unlink()  # gone between the offer and the claim
    assert not claim(paths, new(seen), a) and owner() is None, "a lost claim keeps no link"
    paths.claimed.write_bytes(b"legacy")  # claimed before leases: no owner link
    seen = incoming(b"five")
    assert claim(paths, new(seen), a) and owner() == a, "an ownerless claimed copy is taken"
    paths.incoming.unlink()
    assert not claim(paths, ours, b) and claim(paths, ours, a)
