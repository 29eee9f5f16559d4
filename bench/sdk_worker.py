"""The floor: the raw SDK's ``upload_blob`` of local files, in a child process.

Protocol on stdin/stdout, so the parent times only the uploads (not Python's
start-up and imports) and reads this process's own CPU and peak RSS:

    child:  ready
    parent: go
    child:  P <seconds since go> <bytes uploaded>     (every 0.25 s)
    child:  done <seconds> <cpu seconds> <maxrss KiB>

Files go ``workers`` at a time (threads), each with ``max_concurrency``
parallel blocks of ``block_size``: the same shape as ingestd's uploaders.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--single-put-size", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--no-validate-content", action="store_true")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    from azure.storage.blob import BlobType, ContainerClient

    client = ContainerClient.from_connection_string(
        args.connection_string,
        args.container,
        max_block_size=args.block_size,
        max_single_put_size=args.single_put_size,
    )
    client.get_container_properties()  # connect once before the clock starts
    done_bytes = [0] * len(args.files)
    lock = threading.Lock()

    def upload(index: int, path: str) -> None:
        def hook(current: int, total: int | None) -> None:
            done_bytes[index] = current

        size = os.path.getsize(path)
        with open(path, "rb") as stream:
            client.get_blob_client(args.prefix + os.path.basename(path)).upload_blob(
                stream,
                blob_type=BlobType.BLOCKBLOB,
                length=size,
                overwrite=True,
                max_concurrency=args.concurrency,
                validate_content=not args.no_validate_content,
                progress_hook=hook,
            )
        with lock:
            done_bytes[index] = size

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    started = time.monotonic()
    cpu_started = cpu_seconds()
    finished = threading.Event()

    def report() -> None:
        while not finished.wait(0.25):
            print(f"P {time.monotonic() - started:.3f} {sum(done_bytes)}", flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    with ThreadPoolExecutor(args.workers) as pool:
        for future in [pool.submit(upload, i, p) for i, p in enumerate(args.files)]:
            future.result()
    seconds = time.monotonic() - started
    finished.set()
    reporter.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"P {seconds:.3f} {sum(done_bytes)}", flush=True)
    print(
        "done "
        + json.dumps(
            {"seconds": seconds, "cpu_s": cpu_seconds() - cpu_started, "maxrss_kib": maxrss}
        ),
        flush=True,
    )
    sys.stdin.read()  # stay alive until the parent has read our peak memory
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
