"""Hung NFS: a frozen hard mount never wedges ingestd (issue 3).

The real service (``python -m ingestd``, real Azurite) runs with incoming,
``.processing`` and ``.failed`` on a freezable FUSE passthrough mount that
stands in for the hard-mounted NFS share; staging is a normal local folder,
as in production. The tests freeze the mount (all of it, or only reads past
an offset), inject EIO/ESTALE, and check what an operator and Kubernetes see:
the API keeps answering fast, children stuck in the kernel are killed and
replaced, killed children the kernel keeps are counted and bounded,
``/healthz`` names the stale role and recovers by itself, and no file is lost.

Rules that keep the test runner itself from hanging:

* the test process never makes a syscall on the mount: files are written and
  checked through the backing folder (``layout`` points there: the mount
  serves ``tmp_path/nfs``), processes are read from /proc with psutil;
* every test thaws before the service is stopped (the ``nfs`` fixture thaws
  at teardown too), so killed children can finish dying and be reaped;
* timeouts use pytest-timeout's thread method (setup.cfg).

Measured figures (detection time, API latency during the freeze) are printed;
run with ``-s`` to see them.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from ingestd import scanner as scanner_module
from ingestd.config import Settings
from ingestd.messages import ScanError
from tests.support.azurite import Azurite
from tests.support.service import (
    ApiSampler,
    Layout,
    Service,
    scrape,
    wait_until,
    write_random,
)

if TYPE_CHECKING:
    from tests.conftest import NfsRig

MiB = 1024 * 1024
STALL_S = 2.5
"""Child stall timeout in these tests. Idle children beat at least every
second and a fresh child beats within about a second of its spawn, so 2.5 s
never kills a healthy child, even on two busy cores."""
ENDPOINTS = ("/healthz", "/readyz", "/v1/status")
API_BOUND_S = STALL_S
"""No API call may take this long while the share is frozen. A call that touched
the share would wait for the whole freeze (longer than this) or time out (5 s);
on a busy machine a healthy call takes milliseconds, rarely a few hundred.
The p50/p99 figures are printed, not asserted."""


# ------------------------------------------------------------------------ helpers


def child(service: Service, role: str) -> dict[str, Any]:
    return next(c for c in service.children() if c["role"] == role)


def healthz(service: Service) -> tuple[int, dict[str, Any]]:
    response = service.http.get("/healthz")
    return response.status_code, response.json()


@dataclass
class TreeWatch:
    """Samples the service's process tree from /proc (psutil) while a test runs.

    ``helpers`` are the tree's processes that are neither the parent nor a
    child slot (multiprocessing's resource tracker), counted once at start.
    """

    service: Service
    slots: int
    max_stuck: int
    helpers: int = 0
    peak: int = 0
    peak_tree: list[tuple[int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def bound(self) -> int:
        """Parent + its helpers + one process per slot + APP_MAX_STUCK_CHILDREN."""
        return 1 + self.helpers + self.slots + self.max_stuck

    def __enter__(self) -> TreeWatch:
        children = {c["pid"] for c in self.service.children()}
        tree = self.service.track_pids()
        self.helpers = len(tree - children) - 1
        assert None not in children and children <= tree
        self._thread = threading.Thread(target=self._run, name="tree-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = self._tree()
            if len(tree) > self.peak:
                self.peak, self.peak_tree = len(tree), tree
            self._stop.wait(0.05)

    def _tree(self) -> list[tuple[int, str]]:
        assert self.service.proc is not None
        try:
            parent = psutil.Process(self.service.proc.pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.service.seen_pids.update(p.pid for p in procs)
        tree = []
        for proc in procs:
            try:
                tree.append((proc.pid, proc.status()))
            except psutil.NoSuchProcess:
                continue
        return tree

    def assert_bounded(self) -> None:
        print(
            f"[hung-nfs] process tree peak {self.peak} (bound {self.bound}: parent + "
            f"{self.helpers} helper + {self.slots} slots + {self.max_stuck} stuck): "
            f"{self.peak_tree}"
        )
        assert self.peak <= self.bound, (
            f"{self.peak} processes > bound {self.bound}: {self.peak_tree}"
        )


def new_pid(service: Service, role: str, old_pid: int) -> dict[str, Any] | None:
    """The slot's child once it is another process than ``old_pid``."""
    now = child(service, role)
    return now if now["pid"] not in (None, old_pid) else None


# -------------------------------------------------------------------------- tests


@pytest.mark.timeout(90)
def test_frozen_scan_kills_and_respawns_the_scanner_while_the_api_stays_fast(
    nfs: NfsRig, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """Issue 3, item 1: the scanner blocked in a frozen listing is SIGKILLed and
    replaced after the stall timeout; /healthz, /readyz and /v1/status stay
    answering for the whole freeze; the replacement is told to scan
    again, so a file dropped during the freeze is uploaded after the thaw."""
    service = nfs.start(APP_CHILD_STALL_TIMEOUT_S=str(STALL_S), APP_WORKER_CONCURRENCY="2")
    session = service.start_session("scan-freeze")
    wait_until(lambda: service.status()["scan"]["polls"] >= 2, 20, what="two polls")
    first = child(service, "scanner")

    with ApiSampler(service) as api:
        nfs.mount.freeze()  # the server stops answering: every call on the share waits
        frozen_at = time.monotonic()
        blocked = nfs.mount.wait_blocked(1, pid=first["pid"], timeout=10)
        md5 = write_random(layout.incoming / "dropped-during-freeze.bin", 3 * MiB)
        second = wait_until(
            lambda: new_pid(service, "scanner", first["pid"]),
            STALL_S * 4,
            interval=0.02,
            what="a new scanner",
        )
        detected = time.monotonic() - frozen_at
        # The replacement blocks too (its recovery listing waits) and is replaced in turn.
        third = wait_until(
            lambda: new_pid(service, "scanner", second["pid"]),
            STALL_S * 4,
            interval=0.05,
            what="a third scanner",
        )
        api.wait_for(120, timeout=30)
        status = service.status()
        frozen_for = time.monotonic() - frozen_at
    stats = nfs.mount.stats()
    nfs.mount.thaw()

    print(
        f"\n[hung-nfs] scan freeze: scanner blocked in {blocked[0]['op']}; "
        f"kill+respawn seen in /v1/status {detected:.2f} s after the freeze "
        f"(stall timeout {STALL_S} s); freeze lasted {frozen_for:.1f} s; "
        f"killed calls answered EINTR: {stats['interrupted']}"
    )
    api.report("scan freeze")
    api.assert_answered(minimum=100, bound_s=API_BOUND_S)
    for path in ENDPOINTS:
        assert set(api.codes[path]) == {200}, (path, set(api.codes[path]))
    assert third["pid"] != first["pid"]
    assert status["restarts"]["scanner"] >= 2 and status["kills"]["scanner"] >= 2
    assert "sent no heartbeat" in service.log_text()
    assert sum(stats["interrupted"].values()) >= 1  # the kill ended a frozen call

    wait_until(lambda: service.status()["processed_ok"] >= 1, 60, what="the dropped file")
    blob = f"{session['date_prefix']}/scan-freeze/dropped-during-freeze.bin"
    assert azurite.blob_md5(azurite_container, blob) == md5
    assert layout.files_under(layout.incoming) == []
    assert layout.files_under(layout.processing) == []


@pytest.mark.timeout(150)
def test_frozen_copy_of_a_256_mib_file_kills_the_uploader_and_the_file_survives(
    nfs: NfsRig, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """Issue 3, item 2: reads of the claimed file stop answering at 64 MiB; the
    uploader is killed, the file stays in .processing, and after the thaw it is
    uploaded again with the source's MD5."""
    size, stall_at = 256 * MiB, 64 * MiB
    service = nfs.start(APP_CHILD_STALL_TIMEOUT_S=str(STALL_S), APP_WORKER_CONCURRENCY="1")
    session = service.start_session("copy-freeze")
    nfs.mount.freeze(["read"], glob="/.processing/*", from_offset=stall_at)
    md5 = write_random(layout.incoming / "big.bin", size)

    blocked = nfs.mount.wait_blocked(1, op="read", timeout=60)
    frozen_at = time.monotonic()
    first = child(service, "uploader-1")
    assert {"role", "pid", "state", "file", "heartbeat_age_s", "restarts"} <= set(first)
    assert first["file"] == "big.bin" and first["state"] == "copying", first
    assert blocked[0]["pid"] == first["pid"]
    replaced = wait_until(
        lambda: new_pid(service, "uploader-1", first["pid"]),
        STALL_S * 4,
        interval=0.02,
        what="a new uploader",
    )
    detected = time.monotonic() - frozen_at
    status = service.status()

    claimed = nfs.claimed(session, "big.bin")
    assert claimed.stat().st_size == size, "the claimed file must stay in .processing"
    assert not (layout.incoming / "big.bin").exists()
    assert status["kills"]["uploader"] >= 1 and status["interrupted"] >= 1
    assert "stalled" in status["last_error"] and "big.bin" in status["last_error"]
    assert status["processed_ok"] == 0
    wait_until(
        lambda: service.status()["killed_unreaped"] == 0,
        2.0,
        what="the uploader killed in a read reaped (a hard mount yields to SIGKILL)",
    )

    # The job comes back to the new uploader, which stalls at the same place.
    nfs.mount.wait_blocked(1, op="read", pid=replaced["pid"], timeout=30)
    again = child(service, "uploader-1")
    assert again["file"] == "big.bin" and again["state"] == "copying", again
    nfs.mount.thaw()

    status = service.wait_processed(1, timeout=90)
    print(
        f"\n[hung-nfs] copy freeze at {stall_at // MiB} MiB of {size // MiB} MiB: "
        f"kill+respawn seen in /v1/status {detected:.2f} s after the read blocked "
        f"(stall timeout {STALL_S} s); uploader restarts {status['restarts']}"
    )
    assert status["processed_ok"] == 1 and status["processed_err"] == 0
    assert (
        azurite.blob_md5(azurite_container, f"{session['date_prefix']}/copy-freeze/big.bin") == md5
    )
    assert layout.files_under(layout.processing) == []
    assert layout.files_under(layout.staging) == []


@pytest.mark.timeout(120)
def test_freeze_longer_than_the_liveness_timeout_fails_healthz_then_it_recovers(
    nfs: NfsRig, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """Issue 3, item 3 (and item 5 as production has it): a whole-mount freeze
    that outlasts APP_LIVENESS_TIMEOUT_S turns /healthz 503 naming the scanner,
    whose replacements keep blocking; an uploader killed mid-copy hangs in the
    exit-time flush of its NFS file and is counted; the tree never grows past
    its bound; after the thaw /healthz turns 200 by itself and the file arrives."""
    liveness, uploaders, max_stuck = 3 * STALL_S, 2, 3
    service = nfs.start(
        APP_CHILD_STALL_TIMEOUT_S=str(STALL_S),
        APP_LIVENESS_TIMEOUT_S=str(liveness),
        APP_WORKER_CONCURRENCY=str(uploaders),
        APP_MAX_STUCK_CHILDREN=str(max_stuck),
    )
    session = service.start_session("long-freeze")
    assert healthz(service) == (200, {"ok": True})

    with (
        TreeWatch(service, slots=1 + uploaders, max_stuck=max_stuck) as tree,
        ApiSampler(service) as api,
    ):
        # Catch an uploader mid-copy first, then the whole share stops answering.
        nfs.mount.freeze(["read"], glob="/.processing/*", from_offset=16 * MiB)
        md5 = write_random(layout.incoming / "mid-copy.bin", 64 * MiB)
        reader = nfs.mount.wait_blocked(1, op="read", timeout=60)[0]["pid"]
        nfs.mount.freeze()  # killable: a hard mount, SIGKILL ends the waits
        frozen_at = time.monotonic()

        # The killed uploader's exit flushes its open NFS file and waits there.
        nfs.mount.wait_blocked(1, op="flush", pid=reader, timeout=STALL_S * 4)
        first_503: list[float] = []

        def scanner_named() -> dict[str, Any] | None:
            code, body = healthz(service)
            if code == 503 and not first_503:
                first_503.append(time.monotonic() - frozen_at)
            return body if code == 503 and "scanner" in body["reason"] else None

        body = wait_until(
            scanner_named,
            liveness + STALL_S * 4,
            interval=0.05,
            what="/healthz 503 naming the scanner",
        )
        unhealthy_after = time.monotonic() - frozen_at
        status = service.status()
        frozen_for = time.monotonic() - frozen_at
        nfs.mount.thaw()
        thawed_at = time.monotonic()
        wait_until(
            lambda: healthz(service)[0] == 200,
            STALL_S * 6,
            interval=0.05,
            what="/healthz 200 after the thaw",
        )
        healthy_after = time.monotonic() - thawed_at

    print(
        f"\n[hung-nfs] long freeze (liveness {liveness} s, stall {STALL_S} s): first 503 "
        f"{first_503[0]:.1f} s after the freeze, naming the scanner {unhealthy_after:.1f} s "
        f"after it: {body}; 200 again {healthy_after:.1f} s "
        f"after the thaw; frozen {frozen_for:.1f} s; kills {status['kills']}, "
        f"stuck {status['stuck_children']}, killed unreaped {status['killed_unreaped']}"
    )
    api.report("long freeze")
    api.assert_answered(minimum=100, bound_s=API_BOUND_S)
    tree.assert_bounded()
    assert body["ok"] is False and "scanner has made no progress" in body["reason"], body
    assert "uploader-" in body["reason"], "its replacements block on the claimed file"
    assert status["kills"]["scanner"] >= 2 and status["kills"]["uploader"] >= 1, status
    assert status["stuck_children"] >= 1, "the uploader hanging in its exit flush is counted"

    service.wait_processed(1, timeout=60)
    assert (
        azurite.blob_md5(azurite_container, f"{session['date_prefix']}/long-freeze/mid-copy.bin")
        == md5
    )
    wait_until(lambda: service.status()["killed_unreaped"] == 0, 10, what="every kill reaped")
    assert healthz(service) == (200, {"ok": True})


@pytest.mark.timeout(90)
def test_eio_and_estale_from_the_scan_back_off_and_nothing_is_lost(
    nfs: NfsRig, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """Issue 3, item 4: listing incoming fails with EIO, then ESTALE; the scanner
    logs a WARNING per failure, waits twice as long each time, is never killed,
    and once the share answers again every file arrives intact."""
    service = nfs.start(
        APP_CHILD_STALL_TIMEOUT_S=str(STALL_S), APP_WORKER_CONCURRENCY="1", APP_LOG_FORMAT="json"
    )
    session = service.start_session("scan-errors")
    prefix = f"{session['date_prefix']}/scan-errors/"
    expected = {"before.bin": write_random(layout.incoming / "before.bin", 2 * MiB)}
    service.wait_processed(1, timeout=30)
    scanner_pid = child(service, "scanner")["pid"]

    # The next two listings fail with EIO, the two after with ESTALE (first match wins).
    nfs.mount.fail("readdir", errno.EIO, glob="/incoming", count=2)
    nfs.mount.fail("readdir", errno.ESTALE, glob="/incoming", count=2)
    expected["during.bin"] = write_random(layout.incoming / "during.bin", 2 * MiB)
    states, codes = set(), set()

    def four_errors() -> bool:
        states.add(child(service, "scanner")["state"])
        codes.add(healthz(service)[0])
        return service.status()["scan"]["errors"] >= 4

    wait_until(four_errors, 30, interval=0.05, what="four failed scans")
    failing = service.status()
    assert nfs.mount.stats()["faults"] == [], "every injected fault was used"
    expected["after.bin"] = write_random(layout.incoming / "after.bin", 2 * MiB)
    status = service.wait_processed(len(expected), timeout=60)

    warnings = [
        json.loads(line)
        for line in service.log_text().splitlines()
        if line.startswith("{") and '"scan failed' in line
    ]
    backoffs = [float(w["message"].rsplit("retrying in ", 1)[1].split()[0]) for w in warnings]
    print(f"\n[hung-nfs] scan errors: {[w['message'] for w in warnings]}")
    assert all(w["level"] == "WARNING" and w["role"] == "scanner" for w in warnings)
    assert [w["message"].split(":")[1].strip() for w in warnings[:4]] == [
        "EIO",
        "EIO",
        "ESTALE",
        "ESTALE",
    ]
    assert len(warnings) == status["scan"]["errors"] == 4
    poll = 0.3  # base_env's APP_POLL_INTERVAL_S: the first wait
    assert backoffs == pytest.approx([poll, poll * 2, poll * 4, poll * 8]), backoffs
    assert "ESTALE" in failing["last_error"]
    assert "backoff" in states, states
    assert codes == {200}, "backing off is not a liveness failure"
    assert child(service, "scanner")["pid"] == scanner_pid, "a backing-off scanner is not killed"
    assert status["kills"] == {} and status["restarts"] == {}
    for name, md5 in expected.items():
        assert azurite.blob_md5(azurite_container, prefix + name) == md5, name
    assert status["processed_ok"] == len(expected) and status["processed_err"] == 0
    for folder in (layout.incoming, layout.processing, layout.failed, layout.staging):
        assert layout.files_under(folder) == [], folder


@pytest.mark.timeout(120)
def test_unreapable_children_are_counted_bounded_and_shown_in_metrics(
    nfs: NfsRig, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """Issue 3, item 5, and the observability issue: children killed on a mount
    that does not even yield to SIGKILL stay in the kernel until the thaw. The
    supervisor counts them, stops respawning at APP_MAX_STUCK_CHILDREN, says so
    in /healthz, /v1/status and /metrics, keeps the API fast, and never lets the
    tree grow past its bound; after the thaw they are reaped, the slots are
    filled again and both files arrive."""
    uploaders, max_stuck = 2, 2
    service = nfs.start(
        APP_CHILD_STALL_TIMEOUT_S=str(STALL_S),
        APP_WORKER_CONCURRENCY=str(uploaders),
        APP_MAX_STUCK_CHILDREN=str(max_stuck),
    )
    session = service.start_session("stuck")
    before = scrape(service)
    assert before["ingestd_stuck_children{role=scanner}"] == 0
    assert before["ingestd_stuck_children{role=uploader}"] == 0

    with TreeWatch(service, slots=1 + uploaders, max_stuck=max_stuck) as tree:
        # Both uploaders stall mid-copy, then the scanner: all at about the same time.
        nfs.mount.freeze(["read"], glob="/.processing/*", from_offset=16 * MiB, killable=False)
        md5s = {
            name: write_random(layout.incoming / name, 48 * MiB) for name in ("one.bin", "two.bin")
        }
        for role in ("uploader-1", "uploader-2"):
            nfs.mount.wait_blocked(1, op="read", pid=child(service, role)["pid"], timeout=60)
        nfs.mount.freeze(killable=False)
        frozen_at = time.monotonic()
        with ApiSampler(service) as api:

            def held() -> dict[str, Any] | None:
                status = service.status()
                if status["stuck_children"] >= max_stuck and any(
                    c["held_back"] for c in status["children"]
                ):
                    return status
                return None

            status = wait_until(held, STALL_S * 8, interval=0.05, what="the stuck bound")
            bound_after = time.monotonic() - frozen_at
            code, body = healthz(service)
            during = scrape(service)
            time.sleep(1.0)  # held back: no new child, the count stays put
            later = service.status()
            later_metrics = scrape(service)
            api.wait_for(100, timeout=30)
        stuck_pids = [b["pid"] for b in nfs.mount.stats()["blocked"]]
        states = {pid: psutil.Process(pid).status() for pid in stuck_pids if psutil.pid_exists(pid)}
        nfs.mount.thaw()
        thawed_at = time.monotonic()
        wait_until(
            lambda: service.status()["killed_unreaped"] == 0,
            15,
            what="the stuck children reaped after the thaw",
        )
        reaped_after = time.monotonic() - thawed_at
        final = service.wait_processed(2, timeout=90)

    held_roles = [c["role"] for c in status["children"] if c["held_back"]]
    print(
        f"\n[hung-nfs] unreapable: bound of {max_stuck} reached {bound_after:.1f} s after "
        f"the freeze; held back {held_roles}; killed unreaped {status['killed_unreaped']}; "
        f"/healthz {code} {body}; reaped {reaped_after:.2f} s after the thaw; "
        f"blocked callers {states}"
    )
    scanner_age = "ingestd_child_heartbeat_age_seconds{child=scanner,role=scanner}"
    print(
        f"[hung-nfs] metrics during: stuck {during['ingestd_stuck_children{role=scanner}']:.0f} "
        f"scanner + {during['ingestd_stuck_children{role=uploader}']:.0f} uploader, "
        f"scanner heartbeat age {during[scanner_age]:.1f} -> {later_metrics[scanner_age]:.1f} s"
    )
    api.report("stuck children")
    api.assert_answered(minimum=100, bound_s=API_BOUND_S)
    tree.assert_bounded()

    # /v1/status and /healthz say what happened and where.
    assert status["killed_unreaped"] >= max_stuck
    assert any(c["held_back"] for c in later["children"]), "still held back while frozen"
    assert held_roles and all(
        c["state"] == "held" and c["pid"] is None for c in status["children"] if c["held_back"]
    )
    assert code == 503 and body["ok"] is False
    assert any(role in body["reason"] for role in held_roles) and "stuck" in body["reason"], body
    assert psutil.STATUS_DISK_SLEEP in states.values(), states

    # /metrics moved: stuck children per role, heartbeat age of the held-back slot.
    stuck_now = (
        during["ingestd_stuck_children{role=scanner}"]
        + during["ingestd_stuck_children{role=uploader}"]
    )
    assert stuck_now >= max_stuck
    assert during["ingestd_healthy{}"] == 0
    held_key = next(
        k
        for k in during
        if k.startswith("ingestd_child_heartbeat_age_seconds") and f"child={held_roles[0]}," in k
    )
    assert later_metrics[held_key] > during[held_key] > STALL_S
    assert (
        during["ingestd_child_kills_total{role=scanner}"]
        + during["ingestd_child_kills_total{role=uploader}"]
    ) >= max_stuck

    # After the thaw: reaped, respawned, healthy, nothing lost.
    after = scrape(service)
    assert after["ingestd_stuck_children{role=scanner}"] == 0
    assert after["ingestd_stuck_children{role=uploader}"] == 0
    wait_until(lambda: healthz(service)[0] == 200, STALL_S * 6, what="/healthz 200")
    assert all(c["pid"] and not c["held_back"] for c in service.children())
    for name, md5 in md5s.items():
        assert azurite.blob_md5(azurite_container, f"{session['date_prefix']}/stuck/{name}") == md5
    assert final["processed_err"] == 0


def test_scanner_backoff_doubles_from_the_poll_interval_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The capped exponential backoff itself, without waiting minutes for the cap."""
    settings = Settings(
        azure_account_url="http://127.0.0.1:1/x", azure_container="c", poll_interval_s=0.5
    )
    sent: list[object] = []

    class FakeChannel:
        def send(self, message: object) -> None:
            sent.append(message)

        def beat(self, *args: object, **kwargs: object) -> None:
            pass

    scan = scanner_module.Scanner(
        settings,
        FakeChannel(),  # type: ignore[arg-type]
        "replica~0000000a",
    )
    waits: list[float] = []
    monkeypatch.setattr(scan, "_sleep", waits.append)
    failures = iter(
        [OSError(errno.EIO, "I/O error")] * 10 + [OSError(errno.ESTALE, "Stale file handle")] * 2
    )

    def step() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure

    scan._retrying("scan", step)
    cap = scanner_module.MAX_BACKOFF_S
    assert waits == [min(cap, 0.5 * 2**n) for n in range(12)]
    assert waits[-3:] == [cap, cap, cap]
    assert scan.backoff_s == 0.0, "a success resets the backoff"
    errors = [m for m in sent if isinstance(m, ScanError)]
    assert [e.backoff_s for e in errors] == waits
    assert errors[-1].error.startswith("scan failed: ESTALE")
