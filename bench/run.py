"""``python -m bench``: ingestd against rclone and the raw SDK, on this machine, offline.

One process tree, one run: this process starts one in-memory Azurite on
loopback and one ingestd, then for each round runs the three contenders one
after the other (the order rotates each round) on the same files with the
same block size and concurrency, and verifies every blob's MD5 afterwards,
off the clock. Results go to ``--out`` as ``results.md``, ``results.json``
and ``results.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report, sampler, scancost
from bench.azurite import Azurite
from bench.contenders import (
    Folders,
    Ingestd,
    Result,
    Shape,
    rclone_version,
    run_ingestd,
    run_rclone,
    run_sdk,
)
from bench.corpus import Corpus

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2
CONTAINER = "bench"
CONTENDERS = ("sdk", "rclone", "ingestd")


def _defaults() -> dict[str, int]:
    """ingestd's own defaults, so the bench follows config.py."""
    from ingestd.config import Settings

    fields = Settings.model_fields
    return {
        "workers": fields["worker_concurrency"].default,
        "block_size": fields["azure_max_block_size"].default,
        "concurrency": fields["azure_max_concurrency"].default,
        "single_put_size": fields["azure_max_single_put_size"].default,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = _defaults()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--count", type=int, default=8, help="large files (default 8)")
    p.add_argument("--size-mib", type=float, default=128, help="size of each large file")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each scenario (median)")
    p.add_argument("--small-count", type=int, default=2000, help="small files (0 skips)")
    p.add_argument("--small-size-mib", type=float, default=1)
    p.add_argument("--small-rounds", type=int, default=None, help="default: --rounds")
    p.add_argument(
        "--scan-entries",
        type=int,
        default=10000,
        help="entries waiting in incoming for the scanner-cost test (0 skips)",
    )
    p.add_argument(
        "--scan-window",
        type=float,
        default=10.0,
        help="seconds of the live scanner-cost measurement",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d["workers"],
        help="files at a time: ingestd uploaders, rclone --transfers, SDK threads",
    )
    p.add_argument("--block-size-mib", type=float, default=d["block_size"] / MiB)
    p.add_argument(
        "--concurrency", type=int, default=d["concurrency"], help="parallel blocks per file"
    )
    p.add_argument("--single-put-mib", type=float, default=d["single_put_size"] / MiB)
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.1,
        help="ingestd APP_POLL_INTERVAL_S (its default is 2.0)",
    )
    p.add_argument(
        "--sdk-mode",
        choices=("processes", "threads"),
        default="processes",
        help="the floor as --workers processes (ingestd's shape) or threads",
    )
    p.add_argument(
        "--only", choices=CONTENDERS, action="append", help="run only these contenders (repeatable)"
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch folder (default: a new temp folder, removed at the end)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument(
        "--ingestd-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="run ingestd from another checkout (to compare versions)",
    )
    p.add_argument(
        "--ingestd-env",
        action="append",
        default=[],
        metavar="APP_X=VALUE",
        help="extra environment for ingestd (experiments)",
    )
    return p.parse_args(argv)


@dataclass
class Plan:
    count: int
    size: int
    rounds: int
    small_count: int
    small_size: int
    small_rounds: int
    scan_entries: int
    shape: Shape
    poll_interval_s: float
    contenders: tuple[str, ...]
    sdk_mode: str = "processes"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    import azure.storage.blob

    azurite_pkg = REPO / "tools" / "node_modules" / "azurite" / "package.json"
    azurite = json.loads(azurite_pkg.read_text())["version"] if azurite_pkg.exists() else "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "azure_storage_blob": azure.storage.blob.__version__,
        "rclone": rclone_version(),
        "azurite": azurite,
        "load_before": os.getloadavg(),
        "ingestd_commit": _git("rev-parse", "--short", "HEAD"),
        "ingestd_dirty": bool(_git("status", "--porcelain", "--", "ingestd")),
    }


def md5_accelerator(source: Path) -> bool | None:
    """Whether the ingestd under test hashes with its C accelerator (ingestd._md5pair)
    or falls back to hashlib: a figure from the fallback is not the default's."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "from ingestd import md5pair; print(md5pair.ACCELERATED)"],
            cwd=source,
            env={**os.environ, "PYTHONPATH": str(source)},
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"True": True, "False": False}.get(out)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def verify(
    az: Azurite,
    result: Result,
    prefix: str,
    corpus: Corpus,
    names: list[str],
    stored_required: bool = False,
) -> None:
    """Download every blob, compare its MD5 with the source's, then delete it.

    With ``stored_required`` (ingestd with ``APP_AZURE_PUT_MD5`` on, its
    default) every blob must also carry the whole file's MD5 as its
    Content-MD5, equal to the MD5 of its bytes: what downstream tools verify.
    """
    client = az.container(CONTAINER)

    def check(name: str) -> tuple[bool, bool]:
        digest = hashlib.md5()
        blob = client.get_blob_client(prefix + name)
        download = blob.download_blob(max_concurrency=2)
        for chunk in download.chunks():
            digest.update(chunk)
        ok = digest.hexdigest() == corpus.md5_of(name)
        stored = download.properties.content_settings.content_md5
        stored_ok = stored is not None and bytes(stored).hex() == corpus.md5_of(name)
        blob.delete_blob()
        return ok, stored_ok

    with ThreadPoolExecutor(4) as pool:
        checks = list(pool.map(check, names))
    result.md5_ok = all(ok and (stored or not stored_required) for ok, stored in checks)
    result.md5_checked = sum(ok for ok, _ in checks)
    result.extra["stored_md5_ok"] = sum(stored for _, stored in checks)
    left = [b.name for b in client.list_blobs(name_starts_with=prefix)]
    if left:
        result.extra["unexpected_blobs"] = left[:10]
    client.close()


def run_scenario(
    name: str,
    corpus: Corpus,
    rounds: int,
    plan: Plan,
    az: Azurite,
    service: Ingestd | None,
    work: Path,
    log,
) -> list[Result]:
    results: list[Result] = []
    order = list(plan.contenders)
    for round_ in range(1, rounds + 1):
        names = [f"{name[0]}{round_}-{m}" for m in corpus.names]
        for contender in order:
            prefix = f"{contender}/{name}/"
            az.restart()  # every run starts on an empty Azurite (see Azurite.restart)
            az.create_container(CONTAINER)
            assert az.proc is not None
            sampler.WATCHED["azurite"] = az.proc.pid
            if contender == "sdk":
                result = run_sdk(
                    corpus,
                    names,
                    work / "sdk-src",
                    az.connection_string,
                    CONTAINER,
                    prefix,
                    plan.shape,
                    name,
                    round_,
                    mode=plan.sdk_mode,
                )
            elif contender == "rclone":
                result = run_rclone(
                    corpus,
                    names,
                    work / "rclone-src",
                    az.account_url,
                    CONTAINER,
                    prefix,
                    plan.shape,
                    name,
                    round_,
                    work / "rclone-home",
                )
            else:
                assert service is not None
                prefix = service.blob_prefix()
                result = run_ingestd(
                    service,
                    corpus,
                    names,
                    name,
                    round_,
                    timeout=max(300.0, corpus.total(names) / 5e6),
                )
                service.wait_idle()
            stored_required = (
                contender == "ingestd"
                and service is not None
                and service.env.get("APP_AZURE_PUT_MD5", "true").lower()
                in ("1", "true", "yes", "on")
            )
            verify(az, result, prefix, corpus, names, stored_required)
            results.append(result)
            s = result.summary()
            log(
                f"  {name} round {round_} {contender:8s} {s['mb_s']:8.1f} MB/s "
                f"{s['files_s']:7.1f} files/s  cpu {s['cpu_s_per_gib']:5.2f} s/GiB  "
                f"rss {s['peak_rss_mib']:6.1f} MiB  p99 {s['status_p99_ms']} ms  "
                f"azurite {s.get('azurite_cpu_s_per_gib')} s/GiB  busy {s.get('machine_busy')}  "
                f"md5 {'ok' if result.md5_ok else 'MISMATCH'} ({result.md5_checked})"
            )
        order = order[1:] + order[:1]  # rotate, so no contender always goes first
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        count=args.count,
        size=int(args.size_mib * MiB),
        rounds=args.rounds,
        small_count=args.small_count,
        small_size=int(args.small_size_mib * MiB),
        small_rounds=args.small_rounds if args.small_rounds is not None else args.rounds,
        scan_entries=args.scan_entries,
        shape=Shape(
            workers=args.workers,
            block_size=int(args.block_size_mib * MiB),
            concurrency=args.concurrency,
            single_put_size=int(args.single_put_mib * MiB),
        ),
        poll_interval_s=args.poll_interval,
        contenders=tuple(c for c in CONTENDERS if not args.only or c in args.only),
        sdk_mode=args.sdk_mode,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message: str) -> None:
        print(message, flush=True)

    info = machine()
    info["ingestd_src"] = str(args.ingestd_src or REPO)
    info["md5_accelerator"] = md5_accelerator(args.ingestd_src or REPO)
    log(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
        f"load {info['load_before']}"
    )
    log(f"shape: {asdict(plan.shape)}; scratch {work}")
    results: list[Result] = []
    scan: dict[str, Any] = {}
    try:
        with Azurite(work / "azurite") as az:
            az.create_container(CONTAINER)
            assert az.proc is not None
            sampler.WATCHED["azurite"] = az.proc.pid
            folders = Folders(work / "ingestd").make()
            service = None
            if "ingestd" in plan.contenders:
                extra = dict(kv.split("=", 1) for kv in args.ingestd_env)
                info["ingestd_env"] = extra
                service = Ingestd(
                    folders,
                    az.account_url,
                    az.connection_string,
                    CONTAINER,
                    plan.shape,
                    plan.poll_interval_s,
                    work / "ingestd.log",
                    extra_env=extra,
                    source=args.ingestd_src,
                ).start()
            try:
                if plan.count:
                    log(f"corpus: {plan.count} x {plan.size / MiB:g} MiB")
                    large = Corpus.make(work / "corpus-large", plan.count, plan.size)
                    results += run_scenario(
                        "large", large, plan.rounds, plan, az, service, work, log
                    )
                if plan.small_count:
                    log(f"corpus: {plan.small_count} x {plan.small_size / MiB:g} MiB")
                    small = Corpus.make(work / "corpus-small", plan.small_count, plan.small_size)
                    results += run_scenario(
                        "small", small, plan.small_rounds, plan, az, service, work, log
                    )
                if plan.scan_entries:
                    log(f"scanner cost with {plan.scan_entries} entries waiting")
                    scan = scancost.measure(
                        plan.scan_entries,
                        work / "scan",
                        service,
                        az,
                        CONTAINER,
                        log,
                        args.scan_window,
                    )
            finally:
                if service is not None:
                    service.stop()
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    data = report.build(
        results,
        scan,
        plan,
        info,
        command.strip(),
        started=dt.datetime.fromtimestamp(started, dt.UTC),
        seconds=time.time() - started,
    )
    paths = report.write(data, results, out, make_chart=not args.no_chart)
    log("wrote " + ", ".join(str(p) for p in paths))
    log("")
    log((out / "results.md").read_text())
    bad = [r for r in results if not r.md5_ok or r.sources_gone is False]
    return 1 if bad else 0
