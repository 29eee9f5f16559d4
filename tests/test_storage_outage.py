"""Issue 13: storage brown-outs are outages, not hung children; a killed upload resumes.

End to end: the real service as a process over HTTP, a real in-memory Azurite
behind :class:`~tests.support.proxy.BlobProxy` (loopback only), which passes,
refuses, blackholes, corrupts the SharedKey signature, and counts the bytes
ingestd sends. Every test that moves data checks each blob's MD5 against its
source.

* blackhole and refusal, each longer than both the stall timeout and the
  liveness timeout, with several files in flight: /healthz 200 throughout,
  no child killed, status and metric show the outage; afterwards every file
  arrives, none quarantined, and the retries upload from the staging copy;
* a block thread frozen in a staging read still gets its uploader killed;
* revoked credentials (403) end the service with code 3 and the auth line
  after APP_AUTH_FAILURE_EXIT_S, every file on NFS or committed;
* kill -9 of the whole tree at about 60 % of a 512 MiB file: after the
  restart at most half of its bytes go out again (printed);
* a file changed between the kill and the restart ends up with the new bytes.

Figures (run with ``-s``): ``STORAGE_OUTAGE_S=120`` makes the blackhole last two
minutes; ``STORAGE_KILL_AT=0.3,0.6,0.9`` measures re-sent bytes at each point.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator

import psutil
import pytest

from tests.support.azurite import Azurite
from tests.support.faults import assert_nothing_left, failed_files
from tests.support.proxy import BlobProxy
from tests.support.service import Layout, Service, md5_of, scrape, wait_until, write_random

MiB = 1024 * 1024
STALL_S = "4"
LIVENESS_S = "8"
OUTAGE_S = float(os.environ.get("STORAGE_OUTAGE_S", "12"))
"""How long each outage lasts: longer than the stall (4 s) and liveness (8 s) timeouts."""


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[BlobProxy]:
    with BlobProxy(azurite.port) as running:
        yield running


def through(proxy: BlobProxy, azurite: Azurite) -> dict[str, str]:
    return proxy.service_env(azurite.account_name)


class Watch:
    """Samples /healthz, /v1/status and /metrics every 0.2 s from a thread while an outage lasts."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.healthz: Counter[int] = Counter()
        self.states: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.pids: set[int] = set()
        self.reachable_metric: Counter[float] = Counter()
        self.auth_metric: Counter[float] = Counter()
        self.waiting: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="outage-watch")

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.healthz[self.service.http.get("/healthz").status_code] += 1
                status = self.service.status()
                self.states[status["storage"]["state"]] += 1
                if status["storage"]["reason"]:
                    self.reasons[status["storage"]["reason"]] += 1
                self.pids.update(c["pid"] for c in status["children"] if c["pid"])
                self.waiting.update(c["waiting_on"] or "-" for c in status["children"][1:])
                metrics = scrape(self.service)
                self.reachable_metric[metrics["ingestd_storage_reachable{}"]] += 1
                self.auth_metric[metrics["ingestd_storage_auth_failing{}"]] += 1
            except Exception as exc:  # noqa: BLE001 - any failure to answer is a finding
                self.errors.append(repr(exc))

    def summary(self) -> str:
        return (
            f"/healthz {dict(self.healthz)}, storage states {dict(self.states)}, reasons "
            f"{dict(self.reasons)}, ingestd_storage_reachable {dict(self.reachable_metric)}, "
            f"uploaders waiting on {dict(self.waiting)}, child pids seen {len(self.pids)}"
        )


def uploading(service: Service, count: int) -> bool:
    """At least ``count`` files are part-way through their upload."""
    flights = service.status()["in_flight"]
    return (
        sum(
            1
            for f in flights
            if f["stage"] == "uploading" and 0 < f["bytes_done"] < f["bytes_total"]
        )
        >= count
    )


@pytest.mark.timeout(150 + OUTAGE_S)
@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
def test_an_outage_longer_than_stall_and_liveness_kills_nothing_and_loses_nothing(
    make_service,
    proxy: BlobProxy,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
    fault: str,
) -> None:
    """Three 32 MiB files in flight (a 12 MB/s cap keeps them there) when the endpoint
    blackholes (every request hangs) or refuses (connections reset, then refused) for
    longer than both timeouts. Nothing is killed, /healthz stays 200, status and metric
    say unreachable and why; afterwards every file arrives, uploaded from its staging copy."""
    service = make_service(
        **through(proxy, azurite),
        APP_CHILD_STALL_TIMEOUT_S=STALL_S,
        APP_LIVENESS_TIMEOUT_S=LIVENESS_S,
        APP_WORKER_CONCURRENCY="3",
        APP_AZURE_MAX_BLOCK_SIZE="4MiB",
        APP_AZURE_MAX_CONCURRENCY="2",
        APP_AZURE_MAX_MBPS="12",
    )
    expected = {
        f"{fault}-{i}.bin": write_random(layout.incoming / f"{fault}-{i}.bin", 32 * MiB)
        for i in range(3)
    }
    session = service.start_session(f"outage {fault}")
    prefix = f"{session['date_prefix']}/{session['encoded_session']}/"
    wait_until(lambda: uploading(service, 3), 60, interval=0.05, what="three files mid-upload")
    pids = {c["role"]: c["pid"] for c in service.children()}

    with Watch(service) as watch:
        started = time.monotonic()
        proxy.set_mode(fault)
        expected[f"{fault}-during.bin"] = write_random(
            layout.incoming / f"{fault}-during.bin", 6 * MiB
        )
        shown = wait_until(
            lambda: (s := service.status()["storage"])["state"] == "unreachable" and s,
            OUTAGE_S + 30,
            interval=0.2,
            what="status: storage unreachable",
        )
        shown_after = time.monotonic() - started
        time.sleep(max(2.0, OUTAGE_S - (time.monotonic() - started)))  # the watch sees it
        during = service.status()
        proxy.pass_through()
        lasted = time.monotonic() - started
        status = service.wait_processed(len(expected), timeout=90)
    print(
        f"\n{fault} for {lasted:.0f} s (stall {STALL_S} s, liveness {LIVENESS_S} s): status "
        f"said unreachable ({shown['reason']}) {shown_after:.1f} s in: {shown['error']}; "
        f"{watch.summary()}; failed attempts {status['processed_err']}, kills "
        f"{status['kills']}, restarts {status['restarts']}"
    )

    assert not watch.errors, watch.errors[:3]
    assert set(watch.healthz) == {200}, watch.healthz
    assert status["kills"] == {} and status["restarts"] == {}, (status["kills"], status["restarts"])
    assert {c["role"]: c["pid"] for c in service.children()} == pids, "no child replaced"
    assert during["storage"]["reachable"] is False and during["storage"]["since"]
    assert watch.reachable_metric[0.0] > 0, "the metric showed the outage"
    assert watch.auth_metric[1.0] == 0, "an outage is not an auth failure"
    wanted = "timeout" if fault == "blackhole" else "refused"
    assert shown["reason"] == wanted and watch.reasons[wanted] > 0, (shown, watch.reasons)
    assert (
        status["storage"]["state"] == "ok" and scrape(service)["ingestd_storage_reachable{}"] == 1
    )
    for name, md5 in expected.items():
        assert azurite.blob_md5(azurite_container, prefix + name) == md5, name
    assert status["quarantined"] == 0 and failed_files(layout) == []
    assert_nothing_left(layout)
    log = service.log_text()
    assert "NFS not read again" in log, "a retry after the outage re-read NFS"


@pytest.mark.timeout(120)
def test_a_block_thread_frozen_in_a_staging_read_still_gets_its_uploader_killed(
    fuse_mount,
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """Staging on the freezable mount; reads of the staging copy past 8 MiB stop answering.

    The copy itself finishes (writes are not frozen) and the work loop then only
    waits on its block threads, beating "network" every second; one block thread
    sits in a frozen pread. The beats carry its age, so the uploader is killed
    and replaced within a few stall timeouts; after the thaw the file arrives.
    """
    from tests.test_hung_nfs import child, new_pid

    staging_dir = fuse_mount.path("staging")
    for folder in (layout.incoming, layout.processing, layout.failed, layout.nfs / "staging"):
        folder.mkdir(parents=True, exist_ok=True)

    service = make_service(
        layout_=Layout(nfs=fuse_mount.path(), staging=staging_dir),
        APP_CHILD_STALL_TIMEOUT_S="2.5",
        APP_WORKER_CONCURRENCY="1",
        APP_AZURE_MAX_BLOCK_SIZE="4MiB",
    )
    session = service.start_session("staging-freeze")
    fuse_mount.freeze(["read"], glob="/staging/*", from_offset=8 * MiB)
    try:
        md5 = write_random(layout.incoming / "big.bin", 64 * MiB)
        blocked = fuse_mount.wait_blocked(1, op="read", timeout=60)
        frozen_at = time.monotonic()
        first = child(service, "uploader-1")
        threads = {t.id for t in psutil.Process(first["pid"]).threads()}
        assert blocked[0]["pid"] in threads - {first["pid"]}, "a block thread is the one blocked"
        wait_until(
            lambda: new_pid(service, "uploader-1", first["pid"]),
            2.5 * 4,
            interval=0.02,
            what="the uploader killed and replaced",
        )
        detected = time.monotonic() - frozen_at
        status = service.status()
    finally:
        fuse_mount.thaw()
    print(
        f"\nblock thread frozen in a staging read: uploader replaced {detected:.2f} s "
        f"after the read blocked (stall 2.5 s)"
    )
    assert status["kills"]["uploader"] >= 1
    assert "staging read" in service.log_text()
    service.wait_processed(1, timeout=90)
    assert (
        azurite.blob_md5(azurite_container, f"{session['date_prefix']}/staging-freeze/big.bin")
        == md5
    )


@pytest.mark.timeout(150)
def test_revoked_credentials_exit_with_code_3_and_the_auth_line(
    make_service,
    proxy: BlobProxy,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """The proxy alters every SharedKey signature: storage answers 403. Until
    APP_AUTH_FAILURE_EXIT_S status and metric say "auth failing" (not unreachable);
    then the service stops taking work, settles and exits 3, its last line naming
    the method and the storage error. Every file is on NFS, or committed intact."""
    service = make_service(
        **through(proxy, azurite),
        APP_AUTH_FAILURE_EXIT_S="8",
        APP_WORKER_CONCURRENCY="2",
        APP_AZURE_MAX_BLOCK_SIZE="4MiB",
        APP_AZURE_MAX_MBPS="10",
    )
    expected = {
        f"auth-{i}.bin": write_random(layout.incoming / f"auth-{i}.bin", 24 * MiB) for i in range(2)
    }
    session = service.start_session("revoked")
    prefix = f"{session['date_prefix']}/revoked/"
    claimed_dir = layout.processing / session["date_prefix"] / "revoked"
    wait_until(lambda: uploading(service, 1), 60, interval=0.05, what="a file mid-upload")
    with Watch(service) as watch:
        proxy.corrupt_auth()
        expected["auth-late.bin"] = write_random(layout.incoming / "auth-late.bin", 5 * MiB)
        failing = wait_until(
            lambda: (s := service.status()["storage"])["state"] == "auth_failing" and s,
            30,
            interval=0.1,
            what="auth failing",
        )
        code = service.wait_exit(timeout=60)
    output = service.log_text()
    last = [line for line in output.splitlines() if line.strip()][-1]
    print(
        f"\nrevoked credentials: status {failing}; {watch.summary()}; exit {code}; "
        f"last line: {last}"
    )
    assert code == 3, output[-3000:]
    assert "rejected the connection string" in last and "403" in last, last
    assert azurite.account_key not in output and "AccountKey=" not in output
    assert watch.states["unreachable"] == 0, watch.states
    assert watch.auth_metric[1.0] > 0 and watch.reachable_metric[0.0] == 0
    proxy.pass_through()
    names = set(azurite.blob_names(azurite_container, prefix=prefix))
    for name, md5 in expected.items():
        if prefix + name in names:
            assert azurite.blob_md5(azurite_container, prefix + name) == md5, name
        else:
            where = [p for p in (layout.incoming / name, claimed_dir / name) if p.exists()]
            assert where and md5_of(where[0]) == md5, f"{name} neither committed nor on NFS"
    assert failed_files(layout) == []


# Resume after kill -9 of the whole tree


KILL_AT = [float(x) for x in os.environ.get("STORAGE_KILL_AT", "0.6").split(",")]
BIG = 512 * MiB


def kill_when_sent(service: Service, proxy: BlobProxy, share: float, size: int) -> int:
    """kill -9 the tree once ``share`` of ``size`` bytes went out through the proxy."""
    base = proxy.counts().up_total
    wait_until(
        lambda: proxy.counts().up_total - base >= share * size,
        120,
        interval=0.005,
        what=f"{share:.0%} of the file sent",
    )
    service.kill_tree()
    return proxy.counts().up_total - base


def restart(make_service, env: dict[str, str]) -> tuple[Service, float]:
    started = time.monotonic()
    return make_service(**env), started


@pytest.mark.timeout(300)
@pytest.mark.parametrize("share", KILL_AT)
def test_kill_9_part_way_resends_at_most_half_after_the_restart(
    make_service,
    proxy: BlobProxy,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
    share: float,
) -> None:
    """A 512 MiB file, 8 MiB blocks, 4 at a time; the tree is killed with SIGKILL at
    ``share`` of the bytes sent. The restart's recovery reads the file from NFS again
    (its staging copy is gone with the old run), asks storage which blocks it holds,
    and sends only the others: at most half of the file goes out again."""
    env = {
        **through(proxy, azurite),
        "APP_AZURE_MAX_BLOCK_SIZE": "8MiB",
        "APP_AZURE_MAX_CONCURRENCY": "4",
        "APP_WORKER_CONCURRENCY": "1",
    }
    service = make_service(**env)
    md5 = write_random(layout.incoming / "big.bin", BIG)
    session = service.start_session("resume")
    before = kill_when_sent(service, proxy, share, BIG)
    proxy.reset_counts()
    second, restarted = restart(make_service, env)
    ready = time.monotonic() - restarted
    status = second.wait_processed(1, timeout=120)
    took = time.monotonic() - restarted
    resent = proxy.counts().up
    print(
        f"\nkill -9 at {before / BIG:.0%} sent ({before / MiB:.0f} MiB): after the restart "
        f"{resent / MiB:.1f} MiB ({resent / BIG:.1%} of the file) went out again; ready "
        f"{ready:.1f} s after the restart, committed {took:.1f} s after it"
    )
    assert status["recovered"] == 1
    assert azurite.blob_md5(azurite_container, f"{session['date_prefix']}/resume/big.bin") == md5
    window = 4 * 8 * MiB  # blocks in flight at the kill are sent again whole
    assert resent <= max(BIG / 2, BIG * (1 - share) + window + 8 * MiB), resent
    assert "resumed" in second.log_text()
    assert_nothing_left(layout)


@pytest.mark.timeout(180)
def test_a_file_changed_between_kill_and_restart_gets_its_new_bytes_only(
    make_service,
    proxy: BlobProxy,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """Killed at 60 % of a 96 MiB file; its first and a middle block are overwritten in
    .processing before the restart. The blocks already in storage for those positions
    hold the old bytes under other IDs (MD5 + index) and are never committed: the
    blob is exactly the new file."""
    env = {
        **through(proxy, azurite),
        "APP_AZURE_MAX_BLOCK_SIZE": "4MiB",
        "APP_AZURE_MAX_CONCURRENCY": "2",
        "APP_WORKER_CONCURRENCY": "1",
        "APP_AZURE_MAX_MBPS": "40",
    }
    size = 96 * MiB
    service = make_service(**env)
    old_md5 = write_random(layout.incoming / "changing.bin", size)
    session = service.start_session("changed")
    claimed = layout.processing / session["date_prefix"] / "changed" / "changing.bin"
    kill_when_sent(service, proxy, 0.6, size)
    with open(claimed, "r+b") as stream:
        for offset in (100, 40 * MiB + 5):
            stream.seek(offset)
            stream.write(os.urandom(4096))
    new_md5 = md5_of(claimed)
    assert new_md5 != old_md5
    proxy.reset_counts()
    second, _ = restart(make_service, env)
    second.wait_processed(1, timeout=120)
    resent = proxy.counts().up
    print(
        f"\nchanged between kill and restart: {resent / MiB:.1f} MiB of {size // MiB} MiB "
        f"sent after the restart"
    )
    blob = f"{session['date_prefix']}/changed/changing.bin"
    assert azurite.blob_md5(azurite_container, blob) == new_md5
    assert_nothing_left(layout)
