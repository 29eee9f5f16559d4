"""1 replica against 2 on one share: throughput, duplicates, /v1/status latency.

``python -m tests.scaleout_compare [--files 24] [--size-mib 32] [--rounds 1]``

For each replica count: a fresh container, the same files (random, written to
a drop folder first, then renamed into incoming at once), every replica with
its own staging, its own name and its own blob proxy, so each commit (Put
Blob, Put Block List) is counted per replica at the storage side. The clock
runs from the rename until every blob is committed and incoming and
``.processing`` are empty. Meanwhile /v1/status of replica 0 is read every
50 ms. Every blob is downloaded and its MD5 compared with the source, off the
clock. Not part of the test suite (about a minute); the figures of a run are
in docs/operations.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.support.azurite import Azurite
from tests.support.proxy import BlobProxy
from tests.support.service import Layout, Service, base_env, wait_until
from tests.test_scaleout import commits, through

MiB = 1024 * 1024


def make_files(folder: Path, count: int, size: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for index in range(count):
        data = os.urandom(size)
        name = f"file-{index:03d}.bin"
        (folder / name).write_bytes(data)
        expected[name] = hashlib.md5(data).hexdigest()
    return expected


def sample_status(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=5.0) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"{url}/v1/status").raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            stop.wait(0.05)


def run(
    replicas: int,
    azurite: Azurite,
    work: Path,
    files: dict[str, Path],
    expected: dict[str, str],
    settings: dict[str, str],
) -> dict:
    container = f"compare{replicas}-{int(time.time())}"
    azurite.create_container(container)
    nfs = Layout.under(work / f"r{replicas}")
    nfs.make()
    proxies = [BlobProxy(azurite.port).start() for _ in range(replicas)]
    services = []
    try:
        for index in range(replicas):
            staging = work / f"r{replicas}" / f"staging-{index}"
            staging.mkdir(parents=True)
            env = base_env(
                {
                    **nfs.env(),
                    "APP_LOCAL_STAGING_ROOT": str(staging),
                    "APP_AZURE_CONTAINER": container,
                    "APP_AUTOSTART": "true",
                    "APP_AUTOSTART_SESSION": "compare",
                    "APP_REPLICA_ID": f"replica-{index}",
                    **settings,
                    **through(azurite, proxies[index]),
                }
            )
            services.append(Service(env, work / f"r{replicas}-{index}.log").start())
        drop = nfs.nfs / "drop"
        drop.mkdir()
        for name, path in files.items():
            shutil.copyfile(path, drop / name)
        stop, latencies = threading.Event(), []
        sampler = threading.Thread(target=sample_status, args=(services[0].url, stop, latencies))
        sampler.start()
        started = time.monotonic()
        for name in files:
            os.rename(drop / name, nfs.incoming / name)

        def done() -> bool:
            return (
                not nfs.files_under(nfs.incoming)
                and not nfs.files_under(nfs.processing)
                and len(azurite.blob_names(container)) == len(files)
            )

        wait_until(done, 600, interval=0.05, what="every file delivered")
        seconds = time.monotonic() - started
        stop.set()
        sampler.join()
        statuses = [service.status() for service in services]
        wrong = [
            name
            for name, md5 in expected.items()
            if azurite.blob_md5(
                container, f"{statuses[0]['session']['date_prefix']}/compare/{name}"
            )
            != md5
        ]
        by_replica = [commits(proxy, container) for proxy in proxies]
        total = Counter()
        for counted in by_replica:
            total.update(counted)
        size = sum(path.stat().st_size for path in files.values())
        return {
            "replicas": replicas,
            "seconds": seconds,
            "mb_s": size / 1e6 / seconds,
            "files": len(files),
            "blobs": len(total),
            "md5_mismatches": len(wrong),
            "commits_per_replica": [sum(c.values()) for c in by_replica],
            "duplicates": sum(total.values()) - len(total),
            "status_p50_ms": statistics.median(latencies),
            "status_p99_ms": statistics.quantiles(latencies, n=100)[98],
            "status_samples": len(latencies),
        }
    finally:
        for service in services:
            service.stop()
        for proxy in proxies:
            proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.scaleout_compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    settings = {"APP_LEASE_TIMEOUT_S": "600"}
    work = Path(tempfile.mkdtemp(prefix="scaleout-compare-", dir="/tmp"))
    azurite = Azurite(work / "azurite").start()
    try:
        sources = work / "sources"
        expected = make_files(sources, args.files, args.size_mib * MiB)
        files = {name: sources / name for name in expected}
        rows = []
        for round_ in range(args.rounds):
            for replicas in (1, 2):
                row = run(replicas, azurite, work / f"round{round_}", files, expected, settings)
                rows.append(row)
                print(row, flush=True)
        print(
            f"\n{args.files} x {args.size_mib} MiB, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f} at the end"
        )
        print(
            "| replicas | MB/s | seconds | commits per replica | duplicates | MD5 mismatches "
            "| /v1/status p50 / p99 ms |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['replicas']} | {row['mb_s']:.0f} | {row['seconds']:.1f} | "
                f"{row['commits_per_replica']} | {row['duplicates']} | "
                f"{row['md5_mismatches']} | {row['status_p50_ms']:.1f} / "
                f"{row['status_p99_ms']:.1f} |"
            )
        bad = [
            r for r in rows if r["duplicates"] or r["md5_mismatches"] or r["blobs"] != r["files"]
        ]
        return 1 if bad else 0
    finally:
        azurite.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
