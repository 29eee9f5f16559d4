"""One uploader, in this process, in a loop over small files: its CPU per file.

    .venv/bin/python -m bench.uploader_loop [--files 300] [--size-kib 1024] [--profile tottime]

What the whole bench cannot show on a 2-core machine shared with Azurite:
the uploader's own cost per file, without the parent, the scanner or the
other uploaders competing for the cores (bench/RESULTS.md quotes it for
the changes to the small-file path). The uploader runs every step of a job
(`Uploader.process`: claim, stage with fsync, Put Blob, cleanup) against a
fresh in-memory Azurite, with local folders for NFS and staging; its pipe's
other end is drained by a thread. Each blob's MD5 is checked at the end.
``--profile`` prints cProfile's table sorted by that key (main thread only:
the Put Blob runs on the uploader's network thread and shows as lock waits).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import multiprocessing
import os
import pstats
import tempfile
import threading
import time
from pathlib import Path

from pydantic import SecretStr

from bench.azurite import Azurite
from ingestd.childruntime import Channel
from ingestd.config import Settings
from ingestd.messages import Done, Job
from ingestd.sessions import new_session
from ingestd.storageerrors import CONNECTION_STRING
from ingestd.uploader import Uploader

CONTAINER = "loop"
WARM_UP = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size-kib", type=int, default=1024)
    parser.add_argument("--profile", metavar="SORT", help="cProfile, sorted by SORT (tottime)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uploader-loop-") as scratch:
        run(Path(scratch), args.files, args.size_kib * 1024, args.profile)


def run(root: Path, count: int, size: int, profile: str | None) -> None:
    folders = {name: root / name for name in ("incoming", ".processing", ".failed", "staging")}
    for folder in folders.values():
        folder.mkdir()
    data = os.urandom(size)
    with Azurite(root / "azurite") as azurite:
        azurite.create_container(CONTAINER)
        settings = Settings(
            azure_account_url=azurite.account_url,
            azure_container=CONTAINER,
            azure_connection_string=SecretStr(azurite.connection_string),
            nfs_incoming_dir=folders["incoming"],
            nfs_processing_root=folders[".processing"],
            nfs_failed_root=folders[".failed"],
            local_staging_root=folders["staging"],
        )
        uploader = Uploader(settings, Channel(_drained_pipe()), CONNECTION_STRING, "loop-owner")
        session = new_session("uploader loop")

        def jobs(stem: str, n: int) -> list[Job]:
            made = []
            for i in range(n):
                path = folders["incoming"] / f"{stem}-{i}.bin"
                path.write_bytes(data)
                os.utime(path, (1e9, 1e9))  # old enough, and stable
                stat = path.stat()
                seen = (stat.st_size, stat.st_mtime_ns)
                made.append(Job(path.name, session.date, session.encoded, seen=seen, size=size))
            return made

        for job in jobs("warm", WARM_UP):
            uploader.process(job)
        timed = jobs("file", count)
        profiler = cProfile.Profile(time.process_time) if profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        results = [uploader.process(job) for job in timed]
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        failed = [r for r in results if not isinstance(r, Done)]
        assert not failed, failed[:3]
        expected = hashlib.md5(data).digest()
        with azurite.container(CONTAINER) as client:
            for job in timed[:: max(1, count // 20)]:  # the bytes stored, not their header
                stored = client.download_blob(job.blob_name).readall()
                assert hashlib.md5(stored).digest() == expected, job.blob_name
        print(
            f"{count} files of {size} bytes: {1000 * cpu / count:.2f} ms CPU and "
            f"{1000 * wall / count:.2f} ms wall per file (one uploader, this process)"
        )
        if profiler:
            pstats.Stats(profiler).sort_stats(profile).print_stats(30)


def _drained_pipe() -> multiprocessing.connection.Connection:
    """The child's end of a pipe whose parent end is read (and dropped) by a thread."""
    parent, child = multiprocessing.Pipe()

    def drain() -> None:
        try:
            while True:
                parent.recv()
        except (EOFError, OSError):
            return

    threading.Thread(target=drain, name="drain", daemon=True).start()
    return child


if __name__ == "__main__":
    main()
