"""Replicas on one share: leases, owner links, and who recovers which claimed file.

First the rules of ingestd.leases on plain folders with a hand-driven clock
(fast, exact); then the real service: two replicas on one share (own staging
and own blob proxy each, so every commit is counted per replica at the
storage side) while one of them is killed with -9 over and over, and then
killed for good while it holds claimed files.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from ingestd import leases
from ingestd.leases import Lease, LeaseLost, Observer, Recovery
from tests.support.azurite import Azurite
from tests.support.faults import MiB, assert_all_arrived, assert_nothing_left, folder_layout
from tests.support.proxy import BlobProxy
from tests.support.service import Layout, Service, wait_until, write_random

DATE, SESSION = "20260101", "s"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claim_file(root: Path, name: str, owner: str | None) -> None:
    """A claimed file as an uploader leaves it: owner link first, then the file."""
    folder = root / DATE / SESSION
    (folder / leases.OWNERS).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.symlink(owner, folder / leases.OWNERS / name)
    (folder / name).write_bytes(name.encode())


def replica(root: Path, token: str, clock: Clock, timeout: float = 10.0) -> tuple[Lease, Recovery]:
    lease = Lease(root, token)
    lease.renew()
    return lease, Recovery(root, token, Observer(token, timeout, clock))


def names(result: leases.PassResult) -> set[str]:
    return {claim.name for claim in result.ours}


def holders(root: Path) -> dict[str, str]:
    folder = root / DATE / SESSION / leases.OWNERS
    return {p.name: os.readlink(p) for p in folder.iterdir() if not p.name.startswith(".")}


def noop() -> None:
    """The beat callback, not needed here."""


A, B, C = "pod-a~0000000a", "pod-b~0000000b", "pod-c~0000000c"


@pytest.mark.timeout(10)
def test_start_pass_takes_own_and_ownerless_files_and_leaves_live_owners_alone(
    tmp_path: Path,
) -> None:
    clock = Clock()
    lease_a, _ = replica(tmp_path, A, clock)
    _, recovery_b = replica(tmp_path, B, clock)
    claim_file(tmp_path, "a.bin", A)
    claim_file(tmp_path, "b.bin", B)
    claim_file(tmp_path, "legacy.bin", None)
    assert names(recovery_b.run(start=True, beat=noop)) == {"b.bin", "legacy.bin"}
    assert holders(tmp_path) == {"a.bin": A, "b.bin": B, "legacy.bin": B}
    for _ in range(5):  # A renews, so it stays alive however long B watches
        clock.now += 9
        lease_a.renew()
        assert names(recovery_b.run(start=False, beat=noop)) == set()
    assert holders(tmp_path)["a.bin"] == A


@pytest.mark.timeout(10)
def test_a_dead_replicas_files_go_to_exactly_one_survivor(tmp_path: Path) -> None:
    clock = Clock()
    replica(tmp_path, A, clock)
    lease_b, recovery_b = replica(tmp_path, B, clock)
    lease_c, recovery_c = replica(tmp_path, C, clock)
    for index in range(6):
        claim_file(tmp_path, f"f{index}.bin", A)
    assert not names(recovery_b.run(True, noop)) and not names(recovery_c.run(True, noop))
    clock.now += 9.9  # just short of the timeout since the survivors saw A's lease
    lease_b.renew(), lease_c.renew()
    assert not names(recovery_b.run(False, noop)) and not names(recovery_c.run(False, noop))
    clock.now += 0.2
    taken_b, taken_c = names(recovery_b.run(False, noop)), names(recovery_c.run(False, noop))
    assert taken_b == {f"f{i}.bin" for i in range(6)} and taken_c == set()
    assert set(holders(tmp_path).values()) == {B}
    heirs = leases.read_registry(tmp_path).heirs
    assert heirs == {A: B} and A not in leases.read_registry(tmp_path).leases
    with pytest.raises(LeaseLost):  # A comes back to life (a thawed mount): it must stop
        Lease(tmp_path, A).renew()
    # Later passes report nothing again, and bury A once no file names it.
    assert not names(recovery_b.run(False, noop)) and not names(recovery_c.run(False, noop))
    assert leases.read_registry(tmp_path).heirs == {}


@pytest.mark.timeout(10)
def test_an_heir_that_dies_before_it_relinked_hands_on_to_the_next(tmp_path: Path) -> None:
    clock = Clock()
    replica(tmp_path, A, clock)
    replica(tmp_path, B, clock)
    lease_c, recovery_c = replica(tmp_path, C, clock)
    claim_file(tmp_path, "x.bin", A)
    leases.inherit(tmp_path, A, B)  # B won A's files, then died before relinking them
    recovery_c.run(True, noop)
    clock.now += 5
    lease_c.renew()
    assert names(recovery_c.run(False, noop)) == set(), "B's lease has not expired yet"
    clock.now += 6
    assert names(recovery_c.run(False, noop)) == {"x.bin"}
    assert holders(tmp_path) == {"x.bin": C}


@pytest.mark.timeout(10)
def test_released_leases_and_earlier_lives_are_taken_at_once(tmp_path: Path) -> None:
    clock = Clock()
    lease_a, _ = replica(tmp_path, A, clock)
    _, recovery_b = replica(tmp_path, B, clock)
    claim_file(tmp_path, "a.bin", A)
    claim_file(tmp_path, "old-b.bin", "pod-b~00000001")  # B's pod, before its restart
    assert names(recovery_b.run(True, noop)) == {"old-b.bin"}
    lease_a.release()  # A drained cleanly with a.bin still claimed (grace over)
    assert names(recovery_b.run(False, noop)) == {"a.bin"}
    assert holders(tmp_path) == {"a.bin": B, "old-b.bin": B}
    recovery_b.run(False, noop)
    assert set(os.listdir(tmp_path / leases.LEASES)) == {B}, "dead leases are buried"


@pytest.mark.timeout(10)
def test_a_fresh_observer_waits_a_whole_timeout_whatever_the_lease_says(tmp_path: Path) -> None:
    """No clock on the share is trusted: an old lease is only dead once seen unchanged."""
    clock = Clock()
    replica(tmp_path, A, clock)
    claim_file(tmp_path, "a.bin", A)
    os.utime(tmp_path / leases.LEASES / A, (0, 0))  # an mtime from 1970 changes nothing
    _, recovery_b = replica(tmp_path, B, clock)
    assert names(recovery_b.run(True, noop)) == set()
    clock.now += 10
    assert names(recovery_b.run(False, noop)) == {"a.bin"}


@pytest.mark.timeout(10)
def test_stale_links_of_dead_owners_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    clock = Clock()
    replica(tmp_path, A, clock)
    _, recovery_b = replica(tmp_path, B, clock)
    owners = tmp_path / DATE / SESSION / leases.OWNERS
    owners.mkdir(parents=True)
    os.symlink(A, owners / "being-claimed.bin")  # A's link, its rename not done yet
    os.symlink("pod-b~00000001", owners / "crashed.bin")  # B's earlier life died here
    recovery_b.run(True, noop)
    assert sorted(os.listdir(owners)) == ["being-claimed.bin"]


# The real service: two replicas on one share, each with its own blob proxy.

LEASE_S = 12.0
RENEW_S = leases.renew_interval(LEASE_S)
SETTINGS = {
    "APP_LEASE_TIMEOUT_S": str(LEASE_S),
    "APP_CHILD_STALL_TIMEOUT_S": "8",
    "APP_SHUTDOWN_GRACE_S": "2",
    "APP_AZURE_MAX_BLOCK_SIZE": "1MiB",
    "APP_WORKER_CONCURRENCY": "2",
}


def through(azurite: Azurite, proxy: BlobProxy) -> dict[str, str]:
    """Settings that send this replica's every request through ``proxy``."""
    url = proxy.account_url(azurite.account_name)
    return {
        "APP_AZURE_ACCOUNT_URL": url,
        "APP_AZURE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={azurite.account_name};"
            f"AccountKey={azurite.account_key};BlobEndpoint={url};"
        ),
    }


def commits(proxy: BlobProxy, container: str) -> Counter[str]:
    """Blob name -> Put Blob and Put Block List requests sent through ``proxy``: commits."""
    counted: Counter[str] = Counter()
    for method, target in proxy.requests_seen():
        path, query = urlsplit(target).path, urlsplit(target).query
        parts = path.split("/", 3)  # "", account, container, blob
        if method != "PUT" or len(parts) < 4 or parts[2] != container:
            continue
        if "comp=blocklist" in query or "comp=" not in query:
            counted[unquote(parts[3])] += 1
    return counted


class Replicas:
    """Two replica slots on one share; slot ``i`` keeps its name, staging and proxy."""

    def __init__(
        self,
        make_service,
        layout: Layout,
        tmp_path: Path,
        azurite: Azurite,
        proxies: list[BlobProxy],
    ) -> None:
        self.make_service = make_service
        self.layouts = [folder_layout(layout.nfs, tmp_path / f"staging-{i}") for i in (0, 1)]
        self.azurite = azurite
        self.proxies = proxies

    def start(self, index: int, **overrides: str) -> Service:
        settings = {**SETTINGS, "APP_AUTOSTART": "true", **overrides}
        return self.make_service(
            layout_=self.layouts[index],
            APP_REPLICA_ID=f"replica-{index}",
            **settings,
            **through(self.azurite, self.proxies[index]),
        )


@pytest.fixture
def proxies(azurite: Azurite):
    started = [BlobProxy(azurite.port).start() for _ in range(2)]
    yield started
    for proxy in started:
        proxy.stop()


def visible(folder: Path) -> list[Path]:
    return Layout.under(folder).files_under(folder)


FILES, WRITE_S = 48, 18.0
RESTARTS = 4
"""At least: 4 kill -9 and 2 SIGTERM (a restart takes 3-5 s on a busy 2-core machine)."""


@pytest.mark.timeout(240)
def test_two_replicas_while_one_is_killed_and_restarted_over_and_over(
    make_service,
    layout: Layout,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
    proxies: list[BlobProxy],
) -> None:
    """Replica 0 runs throughout; replica 1 is killed with -9 or SIGTERMed (2 s grace)
    and started again (same name: a container restart) 1-2.5 s after it is ready,
    while 80 files of 2-8 MiB arrive over 30 s. Each replica is capped at 16 MB/s so that both
    usually have uploads in flight when replica 1 restarts: before leases, its
    recovery took replica 0's in-flight files and uploaded them a second time.

    Counted at the storage side, per replica: no blob may be committed by both
    replicas. A blob that replica 1 committed twice was committed and then its
    uploader was killed before it deleted the file (the PRD's documented
    commit-then-crash case: uploaded again by the same replica); those are
    counted and printed, not failed.
    """
    rng = random.Random(14)
    pods = Replicas(make_service, layout, tmp_path, azurite, proxies)
    steady = pods.start(0, APP_AZURE_MAX_MBPS="16", APP_AUTOSTART_SESSION="restarts")
    victim = pods.start(1, APP_AZURE_MAX_MBPS="16", APP_AUTOSTART_SESSION="restarts")
    date = steady.status()["session"]["date_prefix"]
    prefix = f"{date}/restarts/"
    expected: dict[str, str] = {}

    def write() -> None:
        for index in range(FILES):
            name = f"file-{index:02d}.bin"
            expected[name] = write_random(layout.incoming / name, rng.randint(2 * MiB, 8 * MiB))
            time.sleep(WRITE_S / FILES)

    writer = threading.Thread(target=write)
    started = time.monotonic()
    writer.start()
    kills, terms = 0, 0
    while writer.is_alive() or kills + terms < RESTARTS:
        time.sleep(rng.uniform(1.0, 2.5))
        if (kills + terms) % 3 == 2:
            victim.terminate()
            victim.wait_exit(30)
            terms += 1
        else:
            victim.kill_tree()
            kills += 1
        victim = pods.start(1, APP_AZURE_MAX_MBPS="16", APP_AUTOSTART_SESSION="restarts")
    writer.join()

    def delivered() -> bool:
        idle = all(
            not s["in_flight"] and not s["queue"]["depth"]
            for s in (steady.status(), victim.status())
        )
        return (
            idle
            and not visible(layout.incoming)
            and not visible(layout.processing)
            and set(azurite.blob_names(azurite_container, prefix=prefix))
            >= {prefix + name for name in expected}
        )

    wait_until(delivered, 90, interval=0.5, what="every file delivered")
    seconds = time.monotonic() - started
    assert_all_arrived(azurite, azurite_container, prefix, expected)
    for own in pods.layouts:
        assert_nothing_left(own)
    by_replica = [commits(proxy, azurite_container) for proxy in proxies]
    both = sorted(set(by_replica[0]) & set(by_replica[1]))
    repeats = [sum(n - 1 for n in counted.values()) for counted in by_replica]
    print(
        f"\n2 replicas, replica 1 killed -9 {kills}x and SIGTERMed {terms}x, "
        f"{len(expected)} files in {seconds:.1f} s: commits per replica "
        f"{[sum(c.values()) for c in by_replica]}, blobs committed by both replicas "
        f"{len(both)}, repeat commits by one replica after a crash {repeats}"
    )
    assert kills >= 4 and terms >= 2
    assert set(by_replica[0]) | set(by_replica[1]) == {prefix + name for name in expected}
    assert not both, f"uploaded by both replicas: {both}"
    assert repeats[0] == 0, "replica 0 never crashed: it uploaded a file twice"


@pytest.mark.timeout(120)
def test_a_replica_killed_for_good_hands_its_claimed_files_to_the_survivor(
    make_service,
    layout: Layout,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
    proxies: list[BlobProxy],
) -> None:
    """Replica 1 claims 4 files of 6 MiB (4 uploaders; block uploads under a 0.5 MB/s
    cap, so they stay in flight) and is killed with -9 for good. Replica 0 is not
    watching (it claims nothing from incoming) but runs its recovery passes: it must
    take and deliver the 4 files once replica 1's lease expires, not before, and
    within lease + two renew intervals (plus upload time; the bound asserted is
    loose, the figure is printed)."""
    pods = Replicas(make_service, layout, tmp_path, azurite, proxies)
    survivor = pods.start(0, APP_AUTOSTART="false")
    victim = pods.start(
        1, APP_WORKER_CONCURRENCY="4", APP_AZURE_MAX_MBPS="0.5", APP_AUTOSTART_SESSION="handover"
    )
    date = victim.status()["session"]["date_prefix"]
    prefix = f"{date}/handover/"
    expected = {
        f"held-{i}.bin": write_random(layout.incoming / f"held-{i}.bin", 6 * MiB) for i in range(4)
    }
    links = layout.processing / date / "handover" / leases.OWNERS
    wait_until(
        lambda: links.is_dir() and len(os.listdir(links)) == 4 and not visible(layout.incoming),
        20,
        what="replica 1 to claim all 4",
    )
    token = victim.status()["replica"]["lease"]
    assert {os.readlink(links / name) for name in expected} == {token}
    victim.kill_tree()
    killed = time.monotonic()

    def delivered() -> bool:
        return not visible(layout.processing) and set(
            azurite.blob_names(azurite_container, prefix=prefix)
        ) == {prefix + name for name in expected}

    wait_until(delivered, LEASE_S + 60, interval=0.2, what="the survivor to deliver them")
    seconds = time.monotonic() - killed
    status = survivor.status()
    assert_all_arrived(azurite, azurite_container, prefix, expected)
    by_replica = [commits(proxy, azurite_container) for proxy in proxies]
    print(
        f"\nreplica killed for good holding 4 claimed files: delivered by the survivor "
        f"{seconds:.1f} s after the kill (lease timeout {LEASE_S} s, renew every "
        f"{RENEW_S} s); commits per replica {[sum(c.values()) for c in by_replica]}"
    )
    assert status["recovered"] == 4 and status["processed_ok"] == 4, status
    assert by_replica == [Counter({prefix + name: 1 for name in expected}), Counter()]
    assert seconds >= LEASE_S - RENEW_S, "taken before the lease could have expired"
    assert seconds < LEASE_S + 2 * RENEW_S + 30
    assert token.rpartition("~")[0] == "replica-1"
    assert_nothing_left(pods.layouts[0])


@pytest.mark.timeout(90)
def test_backlog_is_what_waits_in_incoming(make_service, layout: Layout) -> None:
    """The scaling signal: stable files waiting in incoming and their bytes, in
    /v1/status and /metrics. One uploader under a 0.5 MB/s cap holds the first
    file; the other four wait in incoming (queued in the parent, not claimed)."""
    from tests.support.service import scrape

    service = make_service(
        APP_AUTOSTART="true",
        APP_AUTOSTART_SESSION="backlog",
        APP_WORKER_CONCURRENCY="1",
        APP_AZURE_MAX_MBPS="0.5",
        APP_AZURE_MAX_BLOCK_SIZE="1MiB",
    )
    for index in range(5):
        write_random(layout.incoming / f"wait-{index}.bin", 6 * MiB + index)

    def backlog() -> dict | None:
        # The backlog is as of the scanner's last poll: wait until that poll
        # saw the four files that wait now (an earlier one may have seen
        # another set, before the first claim and the last file's stability).
        status = service.status()
        waiting = [p for p in layout.incoming.iterdir() if not p.name.startswith(".")]
        expected = {"files": 4, "bytes": sum(p.stat().st_size for p in waiting)}
        if status["in_flight"] and len(waiting) == 4 and status["backlog"] == expected:
            return {"status": status["backlog"], "bytes": expected["bytes"]}
        return None

    seen = wait_until(backlog, 30, interval=0.2, what="one file in flight, four waiting")
    samples = scrape(service)
    assert samples["ingestd_backlog_files{}"] == 4
    assert samples["ingestd_backlog_bytes{}"] == seen["bytes"]
    service.stop_session()
    assert service.status()["backlog"] == {"files": 0, "bytes": 0}, "not watching: no backlog"
