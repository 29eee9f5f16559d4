"""One in-memory Azurite on 127.0.0.1 for the benchmark, telemetry off.

Leaner than ``tests/support/azurite.py`` (no pytest, no HTTPS); the bench takes
only the dev account and ``free_port`` from ``tests/support/devstore.py``, which
is plain standard library.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import devstore
from tests.support.devstore import free_port

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / "tools" / "node_modules" / ".bin" / "azurite-blob"
HOST = devstore.LOOPBACK


class Azurite:
    """``with Azurite(workdir) as az:`` starts it on a free port and stops it after."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "azurite.log"

    @property
    def account_url(self) -> str:
        return devstore.account_url(self.port)

    @property
    def connection_string(self) -> str:
        return devstore.connection_string(self.account_url)

    def command(self) -> list[str]:
        args = [
            str(BINARY),
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.port),
            "--inMemoryPersistence",
            "--silent",
        ]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "KILL", "--", *args] if setpriv else args

    def start(self) -> Azurite:
        if not BINARY.exists():
            raise RuntimeError(f"azurite-blob not found at {BINARY} (run npm ci in tools/)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Azurite exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("Azurite did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def restart(self) -> Azurite:
        """A fresh, empty Azurite on the same port.

        Azurite's in-memory store does not give back the space of deleted
        blobs and gets slower as it fills (measured: its CPU per GiB went
        from about 4.5 s to over 7 s after three rounds), so each contender's
        run starts from an empty one. Clients on the old one see their
        connections closed and open new ones.
        """
        self.stop()
        return self.start()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def container(self, name: str):
        from azure.storage.blob import ContainerClient

        return ContainerClient.from_connection_string(self.connection_string, name)

    def create_container(self, name: str):
        from azure.core.exceptions import ResourceExistsError

        client = self.container(name)
        try:
            client.create_container()
        except ResourceExistsError:
            pass
        return client
