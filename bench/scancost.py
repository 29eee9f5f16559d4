"""What one poll of incoming costs when thousands of files wait there.

Two measurements:

* **isolated**: ingestd's own scanner functions (``list_incoming`` and
  ``stable_files``) over folders of 1,000 / N / 2N entries, in this process,
  so the cost per entry can be read off and checked for linearity;
* **live**: N stable files renamed into the running service's incoming at
  once (more than its queue holds, so most of them wait there), then the
  scanner's and the parent's CPU per poll, the poll's own duration as the
  scanner reports it, the files per second and the ``/v1/status`` latency,
  over a window of polls. Then the session is stopped and the rest removed.
"""

from __future__ import annotations

import hashlib
import os
import resource
import statistics
import time
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import psutil

from bench.contenders import Ingestd, StatusSampler, percentile

OLD_S = 24 * 3600
WINDOW_S = 10.0
PAYLOAD = os.urandom(4096)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fill(folder: Path, entries: int, master: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"scan-{i:06d}.bin" for i in range(entries)]
    for name in names:
        os.link(master, folder / name)
    return names


def isolated(entries: int, work: Path, repeats: int = 7) -> list[dict[str, Any]]:
    from ingestd.childruntime import Channel
    from ingestd.scanner import list_incoming, stable_files

    master = work / "master.bin"
    master.write_bytes(PAYLOAD)
    os.utime(master, (time.time() - OLD_S,) * 2)
    rows = []
    parent_end, child_end = Pipe()
    channel = Channel(child_end)
    for count in sorted({1000, entries, 2 * entries}):
        folder = work / f"iso-{count}"
        _fill(folder, count, master)
        previous: dict = {}
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), _cpu()
            listing = list_incoming(folder, channel)
            stable = stable_files(previous, listing.files, time.time_ns(), 5.0)
            walls.append(time.perf_counter() - wall)
            cpus.append(_cpu() - cpu)
            previous = listing.files
            while parent_end.poll():
                parent_end.recv()
        assert len(stable) == count
        wall_ms = statistics.median(walls) * 1000
        rows.append(
            {
                "entries": count,
                "poll_ms": round(wall_ms, 2),
                "cpu_ms": round(statistics.median(cpus) * 1000, 2),
                "us_per_entry": round(wall_ms * 1000 / count, 2),
            }
        )
        for name in os.listdir(folder):
            os.unlink(folder / name)
    return rows


def live(
    entries: int, work: Path, service: Ingestd, az, container: str, window_s: float = WINDOW_S
) -> dict[str, Any]:
    folders = service.folders
    master = work / "live-master.bin"
    master.write_bytes(PAYLOAD)
    os.utime(master, (time.time() - OLD_S,) * 2)
    drop = folders.drop / "scan"
    names = _fill(drop, entries, master)
    status = service.status()
    roles = {c["role"]: c["pid"] for c in status["children"]}
    scanner = psutil.Process(roles["scanner"])
    parent = psutil.Process(service.pid)
    uploaders = [psutil.Process(p) for r, p in roles.items() if r.startswith("uploader") and p]

    def cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    for name in names:
        os.rename(drop / name, folders.incoming / name)
    # Let the first polls find them stable and fill the queue, then measure a window.
    time.sleep(2.5 * service_poll(service))
    before = service.status()
    c0 = {
        "scanner": cpu(scanner),
        "parent": cpu(parent),
        "uploaders": sum(cpu(u) for u in uploaders),
    }
    started = time.monotonic()
    sampler = StatusSampler(service.url, started, before, 10**12).start()
    time.sleep(window_s)
    sampler.stop()
    seconds = time.monotonic() - started
    after = service.status()
    c1 = {
        "scanner": cpu(scanner),
        "parent": cpu(parent),
        "uploaders": sum(cpu(u) for u in uploaders),
    }
    polls = after["scan"]["polls"] - before["scan"]["polls"]
    done = after["processed_ok"] - before["processed_ok"]
    durations = [
        s["last_seconds"] * 1000 for s in sampler.scans if s.get("last_seen", 0) > entries // 2
    ]
    waiting = after["scan"]["last_seen"]
    # Stop, take the rest away, let what is queued finish (as "gone"), start again.
    service.http.post("/v1/watch/stop")
    for name in os.listdir(folders.incoming):
        if name.startswith("scan-"):
            (folders.incoming / name).unlink(missing_ok=True)
    service.wait_idle()
    uploaded = after["processed_ok"]
    prefix = service.blob_prefix()
    client = az.container(container)
    expected = hashlib.md5(PAYLOAD).hexdigest()
    blobs = [b.name for b in client.list_blobs(name_starts_with=prefix + "scan-")]
    bad = 0
    for blob in blobs:
        data = client.get_blob_client(blob).download_blob().readall()
        bad += hashlib.md5(data).hexdigest() != expected
        client.get_blob_client(blob).delete_blob()
    client.close()
    service.http.post("/v1/watch/start", json={"session_name": "bench"})
    latencies = [ms for _, ms in sampler.latencies]
    return {
        "entries": entries,
        "window_s": round(seconds, 1),
        "polls": polls,
        "waiting_in_incoming_at_end": waiting,
        "scanner_cpu_ms_per_poll": round((c1["scanner"] - c0["scanner"]) * 1000 / max(polls, 1), 1),
        "parent_cpu_ms_per_poll": round((c1["parent"] - c0["parent"]) * 1000 / max(polls, 1), 1),
        "parent_cpu_share": round((c1["parent"] - c0["parent"]) / seconds, 3),
        "scanner_cpu_share": round((c1["scanner"] - c0["scanner"]) / seconds, 3),
        "poll_ms_median": round(statistics.median(durations), 1) if durations else None,
        "poll_ms_max": round(max(durations), 1) if durations else None,
        "files_done_in_window": done,
        "files_s": round(done / seconds, 1),
        "status_p50_ms": _r(percentile(latencies, 50)),
        "status_p99_ms": _r(percentile(latencies, 99)),
        "status_samples": len(latencies),
        "blobs_verified": len(blobs),
        "md5_mismatches": bad,
        "uploaded_total": uploaded,
        "dropped_full_total": after["queue"].get("dropped_full"),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def service_poll(service: Ingestd) -> float:
    return float(service.env["APP_POLL_INTERVAL_S"])


def measure(
    entries: int,
    work: Path,
    service: Ingestd | None,
    az,
    container: str,
    log,
    window_s: float = WINDOW_S,
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"isolated": isolated(entries, work)}
    for row in result["isolated"]:
        log(
            f"  isolated: {row['entries']:6d} entries  {row['poll_ms']:7.2f} ms/poll  "
            f"{row['us_per_entry']:5.2f} us/entry"
        )
    if service is not None:
        result["live"] = live(entries, work, service, az, container, window_s)
        log(f"  live: {result['live']}")
    return result
