"""The real ingestd, started as a process and driven over HTTP, for tests.

The service runs in its own process group so a test can ``kill -9`` the whole
tree at once, exactly as a node failure would, and check afterwards that no
process of the tree is left behind.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil

from tests.support import devstore
from tests.support.checks import samples
from tests.support.devstore import free_port

if TYPE_CHECKING:
    from tests.support.azurite import Azurite

REPO = Path(__file__).resolve().parents[2]


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def write_random(path: Path, size: int, seed: int | None = None) -> str:
    """Write ``size`` random bytes the way a writer would (temp dotfile, then rename).

    Returns the MD5 of what was written.
    """
    digest = hashlib.md5()
    temp = path.with_name(f".{path.name[:200]}.{uuid.uuid4().hex}.part")
    chunk = 4 * 1024 * 1024
    with open(temp, "wb") as stream:
        left = size
        while left > 0:
            block = os.urandom(min(chunk, left))
            digest.update(block)
            stream.write(block)
            left -= len(block)
    os.rename(temp, path)
    return digest.hexdigest()


@dataclass(frozen=True)
class Layout:
    """The service's folders: an NFS root (incoming, .processing, .failed) and staging.

    ``Layout.under(tmp_path)`` puts both under one folder (``nfs/``, ``staging/``);
    ``Layout(nfs, staging)`` names them apart: the NFS root on a FUSE mount or
    shared by replicas, staging on a tmpfs or one per replica.
    """

    nfs: Path
    staging: Path

    @classmethod
    def under(cls, root: Path) -> Layout:
        return cls(nfs=root / "nfs", staging=root / "staging")

    @property
    def root(self) -> Path:
        """The folder holding the NFS root: scratch space on the same filesystem."""
        return self.nfs.parent

    @property
    def incoming(self) -> Path:
        return self.nfs / "incoming"

    @property
    def processing(self) -> Path:
        return self.nfs / ".processing"

    @property
    def failed(self) -> Path:
        return self.nfs / ".failed"

    def make(self) -> Layout:
        for folder in (self.incoming, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def env(self) -> dict[str, str]:
        return {
            "APP_NFS_INCOMING_DIR": str(self.incoming),
            "APP_NFS_PROCESSING_ROOT": str(self.processing),
            "APP_NFS_FAILED_ROOT": str(self.failed),
            "APP_LOCAL_STAGING_ROOT": str(self.staging),
        }

    def files_under(self, folder: Path) -> list[Path]:
        """Regular files below ``folder``, ignoring the bookkeeping dot-folders."""
        if not folder.exists():
            return []
        return sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )


def azurite_env(azurite: Azurite, container: str, *, endpoint: str | None = None) -> dict[str, str]:
    """Settings that point the service at ``azurite`` with the dev account's shared key.

    ``endpoint``: reach it through something in between (a proxy) at that URL instead.
    """
    url = endpoint or azurite.account_url
    return {
        "APP_AZURE_ACCOUNT_URL": url,
        "APP_AZURE_CONTAINER": container,
        "APP_AZURE_CONNECTION_STRING": devstore.connection_string(url),
    }


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for the service: no inherited Azure or APP_ settings.

    ``AZURE_TOKEN_CREDENTIALS=EnvironmentCredential`` narrows
    DefaultAzureCredential to one credential that reads only variables, so it
    can never probe IMDS; tests of managed identity replace it.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",
        "APP_HTTP_HOST": "127.0.0.1",
        "APP_POLL_INTERVAL_S": "0.3",
        "APP_MIN_FILE_AGE_S": "0.5",
        "APP_AZURE_STARTUP_TIMEOUT_S": "15",
    }
    env.update(extra or {})
    return env


class Service:
    """One ingestd process tree."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.env.setdefault("APP_HTTP_PORT", str(free_port()))
        self.port = int(self.env["APP_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()
        # With APP_API_TOKEN set, the helpers below send it; tests of the token
        # itself use a client of their own (see tests/test_control_plane.py).
        token = self.env.get("APP_API_TOKEN")
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, timeout=5.0, headers=auth)

    # Lifecycle

    def start(self, wait: bool = True, timeout: float = 60.0) -> Service:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"ingestd exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                return self.http.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, what="ingestd /readyz")
        wait_until(lambda: self.status()["recovery_done"], timeout, what="recovery")
        self.track_pids()

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def track_pids(self) -> set[int]:
        """Remember every pid of the tree, to check later that none survives."""
        if self.proc is None:
            return set()
        try:
            parent = psutil.Process(self.proc.pid)
            pids = {parent.pid} | {c.pid for c in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            pids = set()
        self.seen_pids |= pids
        return pids

    def tree_size(self) -> int:
        return len(self.track_pids())

    def kill_tree(self) -> None:
        """``kill -9`` on the process group: the whole service dies at once."""
        if self.proc is None:
            return
        self.track_pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        # SIGKILL is delivered at once but each process still has to run its
        # exit; on a busy machine (uploaders run at nice 10) that takes some
        # milliseconds, so "all dead" is awaited, briefly, not assumed.
        wait_until(
            lambda: not self.survivors(), 10, interval=0.01, what="every killed process to exit"
        )

    def terminate(self) -> None:
        assert self.proc is not None
        self.track_pids()
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Kill whatever is left and check that no process of the tree survives."""
        self.kill_tree()
        self.http.close()
        wait_until(lambda: not self.survivors(), 30, what="the service's processes to exit")

    def survivors(self) -> list[int]:
        alive = []
        for pid in self.seen_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return alive

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # HTTP

    def status(self) -> dict[str, Any]:
        response = self.http.get("/v1/status")
        response.raise_for_status()
        return response.json()

    def start_session(self, name: str | None = None) -> dict[str, Any]:
        body = {} if name is None else {"session_name": name}
        response = self.http.post("/v1/watch/start", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def stop_session(self) -> None:
        response = self.http.post("/v1/watch/stop")
        assert response.status_code == 200, response.text

    def wait_processed(self, count: int, timeout: float) -> dict[str, Any]:
        """Wait until ``processed_ok`` reaches ``count`` and nothing is in flight."""

        def done() -> dict[str, Any] | None:
            status = self.status()
            if status["processed_ok"] >= count and not status["in_flight"]:
                return status
            return None

        return wait_until(done, timeout, interval=0.2, what=f"{count} files uploaded")

    def children(self) -> list[dict[str, Any]]:
        return self.status()["children"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: at least ``q`` of the values are at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class ApiSampler:
    """Calls API endpoints in turn from a thread, timing each call, until the block ends.

    The thread never asserts: what goes wrong (a transport error, a timeout, an
    exception) is recorded in ``errors`` and ``assert_answered`` fails the test
    on it. (An assertion inside the thread would only end the thread, and
    pytest would turn it into a warning.) Latency figures are printed by
    ``report``; the only bound asserted is the behaviour's: no call waited as
    long as ``bound_s``, chosen by the test far above what a busy machine adds.
    """

    def __init__(
        self,
        service: Service,
        endpoints: tuple[str, ...] = ("/healthz", "/readyz", "/v1/status"),
        pause_s: float = 0.01,
    ) -> None:
        self.url = service.url
        self.headers = dict(service.http.headers)
        self.pause_s = pause_s
        self.latencies: dict[str, list[float]] = {path: [] for path in endpoints}
        self.codes: dict[str, list[int]] = {path: [] for path in endpoints}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-sampler", daemon=True)

    def __enter__(self) -> ApiSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            self.errors.append("the sampler thread did not stop within 30 s")

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=5.0, headers=self.headers) as client:
                while not self._stop.is_set():
                    for path in self.latencies:
                        started = time.perf_counter()
                        try:
                            code = client.get(path).status_code
                        except httpx.HTTPError as exc:
                            self.errors.append(f"{path}: {exc!r}")
                            code = 0
                        self.latencies[path].append(time.perf_counter() - started)
                        self.codes[path].append(code)
                    self._stop.wait(self.pause_s)
        except Exception as exc:  # anything else: recorded, so the test fails on it
            self.errors.append(f"sampler thread died: {exc!r}")

    def count(self) -> int:
        return min(len(v) for v in self.latencies.values())

    def wait_for(self, count: int, timeout: float) -> None:
        wait_until(
            lambda: self.count() >= count or self.errors,
            timeout,
            interval=0.05,
            what=f"{count} requests per endpoint",
        )

    def report(self, label: str) -> dict[str, tuple[float, float, float]]:
        """Print p50/p99/max per endpoint (ms) and return them."""
        figures = {}
        for path, values in self.latencies.items():
            if not values:
                print(f"[api] {label}: {path} no requests")
                continue
            p50 = statistics.median(values) * 1000
            p99 = percentile(values, 0.99) * 1000
            top = max(values) * 1000
            figures[path] = (p50, p99, top)
            print(
                f"[api] {label}: {path} {len(values)} requests, p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms, max {top:.1f} ms"
            )
        return figures

    def assert_answered(self, minimum: int, bound_s: float) -> None:
        """Each endpoint answered ``minimum`` times or more, every call in under ``bound_s``."""
        assert not self.errors, self.errors[:5]
        for path, values in self.latencies.items():
            assert len(values) >= minimum, f"{path}: only {len(values)} requests"
            slowest = max(values)
            assert slowest < bound_s, f"{path}: a call took {slowest:.2f} s (bound {bound_s} s)"


def scrape(service: Service) -> dict[str, float]:
    """Every sample of /metrics as ``name{labels}`` -> value, via prometheus_client's parser."""
    response = service.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def run_once(env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ingestd expecting it to exit by itself (a start-up failure)."""
    return subprocess.run(
        [sys.executable, "-m", "ingestd"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
