"""A real Azurite blob emulator, run as a child process, for end-to-end tests.

Why a real process and not a mock: ingestd's behaviour under failure (Azurite
stopped mid-batch, restarted with its data, a wrong credential, HTTPS with
OAuth) is what the tests must prove, and only the real server shows it.

Every instance listens on 127.0.0.1 only, on a free port, with telemetry off
(Azurite otherwise phones a public endpoint). Its stdout/stderr go to a log
file. The process runs in its own session and, where ``setpriv`` exists, gets
SIGKILL when the test process dies, so a crashed or killed pytest leaves no
Azurite behind; ``stop()`` and the fixtures' teardown end it in normal runs.

Fixtures (register them in ``tests/conftest.py`` with
``pytest_plugins = ["tests.support.azurite", ...]``):

* ``azurite`` - session-scoped, HTTP, in memory; a container already exists,
  its name is the ``azurite_container`` fixture.
* ``azurite_https`` - session-scoped, HTTPS (trustme CA) + ``--oauth basic``,
  in memory; also has ``azurite_container`` created.
* ``azurite_factory`` - function-scoped factory for more instances, typically
  persistent ones (``--location``) that a test stops and starts again.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import devstore
from tests.support.devstore import ACCOUNT_KEY, ACCOUNT_NAME, LOOPBACK, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO_ROOT / "tools" / "node_modules" / ".bin" / "azurite-blob"

_READY_MARKER = "successfully listens on"

# Every instance started and not yet stopped; killed at interpreter exit so a
# test that forgot stop() (or an aborted session) leaves no process behind.
_LIVE: set[Azurite] = set()
_LIVE_LOCK = threading.Lock()


class AzuriteError(RuntimeError):
    """Azurite did not start, or died; the message carries its log tail."""


class Azurite:
    """One Azurite blob service process on 127.0.0.1.

    ``start()`` picks a free port the first time and keeps it, so ``stop()``
    then ``start()`` comes back at the same ``account_url``; with
    ``location`` set the committed blobs survive that (Azurite saves its
    metadata on SIGTERM and every 5 s), in memory they do not.

    Example::

        with Azurite(tmp_path, location=tmp_path / "data") as az:
            az.create_container("landing")
            az.container_client("landing").upload_blob("a", b"x")
            az.stop(); az.start()
            assert az.blob_md5("landing", "a") == hashlib.md5(b"x").hexdigest()
    """

    account_name: str = ACCOUNT_NAME
    account_key: str = ACCOUNT_KEY

    def __init__(
        self,
        workdir: Path,
        *,
        https: bool = False,
        oauth: bool | None = None,
        location: Path | None = None,
        port: int | None = None,
        binary: Path | None = None,
        extent_memory_limit_mb: int | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare (not start) an instance.

        :param workdir: directory for the log file and, for HTTPS, the certs.
        :param https: serve HTTPS with a trustme CA (``ca_bundle_path``).
        :param oauth: ``--oauth basic``; defaults to ``https`` because Azurite
            accepts bearer tokens only over HTTPS.
        :param location: persist to this directory; ``None`` = in memory.
        :param port: fixed port; ``None`` = a free one chosen at first start.
        :param binary: azurite-blob path; env ``AZURITE_BLOB_BIN`` or the
            repo's ``tools/node_modules/.bin/azurite-blob`` by default.
        :param extent_memory_limit_mb: cap on in-memory blob data (Azurite's
            default is half the machine's RAM).
        """
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.https = https
        self.oauth = https if oauth is None else oauth
        if self.oauth and not https:
            raise ValueError("Azurite's --oauth basic needs HTTPS")
        self.location = Path(location) if location is not None else None
        self.port: int | None = port
        self.binary = Path(binary or os.environ.get("AZURITE_BLOB_BIN") or DEFAULT_BINARY)
        self.extent_memory_limit_mb = extent_memory_limit_mb
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.log_path = self.workdir / f"azurite-{uuid.uuid4().hex[:8]}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._cert_path: Path | None = None
        self._key_path: Path | None = None
        self._ca_path: Path | None = None
        if https:
            self._make_certs()

    # ----------------------------------------------------------------- state
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def scheme(self) -> str:
        return "https" if self.https else "http"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def account_url(self) -> str:
        """``http(s)://127.0.0.1:PORT/devstoreaccount1`` (path-style, as Azurite wants)."""
        return f"{self.scheme}://{self.host}:{self._require_port()}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        """Shared-key connection string; for HTTPS also pass ``connection_verify``."""
        return devstore.connection_string(self.account_url)

    @property
    def ca_bundle_path(self) -> str | None:
        """PEM of the CA that signed Azurite's certificate (HTTPS mode), else None."""
        return str(self._ca_path) if self._ca_path else None

    @property
    def connection_verify(self) -> Any:
        """Value for the SDK's ``connection_verify`` kwarg: the CA path or True."""
        return self.ca_bundle_path or True

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of Azurite's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def _require_port(self) -> int:
        if self.port is None:
            raise AzuriteError("Azurite has no port yet: call start() first")
        return self.port

    # ------------------------------------------------------------- lifecycle
    def _make_certs(self) -> None:
        """Issue a server cert for IP 127.0.0.1 and localhost from a fresh trustme CA.

        trustme puts IP addresses into the SAN as iPAddress entries, which is
        what Python's ssl hostname check needs for ``https://127.0.0.1``.
        """
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert(LOOPBACK, "localhost")
        certdir = self.workdir / f"tls-{uuid.uuid4().hex[:8]}"
        certdir.mkdir()
        self._cert_path = certdir / "cert.pem"
        self._key_path = certdir / "key.pem"
        self._ca_path = certdir / "ca.pem"
        cert.cert_chain_pems[0].write_to_path(str(self._cert_path))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(self._cert_path), append=True)
        cert.private_key_pem.write_to_path(str(self._key_path))
        ca.cert_pem.write_to_path(str(self._ca_path))

    def command(self) -> list[str]:
        """The argv Azurite runs with (telemetry off, loopback only)."""
        args = [
            str(self.binary),
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--blobHost",
            LOOPBACK,
            "--blobPort",
            str(self._require_port()),
        ]
        if self.location is not None:
            args += ["--location", str(self.location)]
        else:
            args += ["--inMemoryPersistence"]
            if self.extent_memory_limit_mb is not None:
                args += ["--extentMemoryLimit", str(self.extent_memory_limit_mb)]
        if self.https:
            args += ["--cert", str(self._cert_path), "--key", str(self._key_path)]
        if self.oauth:
            args += ["--oauth", "basic"]
        args += self.extra_args
        setpriv = shutil.which("setpriv")
        if setpriv:
            # Kill Azurite if the test process dies without tearing down.
            args = [setpriv, "--pdeathsig", "KILL", "--", *args]
        return args

    def start(self) -> Azurite:
        """Start (or restart on the same port) and wait until Azurite listens."""
        if self.running:
            return self
        if not self.binary.exists():
            raise AzuriteError(f"azurite-blob not found at {self.binary} (npm ci in tools/)")
        if self.location is not None:
            self.location.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for _attempt in range(5):
            if not fixed_port:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except AzuriteError as exc:
                if fixed_port or "EADDRINUSE" not in str(exc):
                    raise
        raise AzuriteError("could not find a free port for Azurite")

    def _spawn_and_wait(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ)
        env.pop("AZURITE_ACCOUNTS", None)  # keep the well-known dev account
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.location or self.workdir),
                env=env,
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(offset)
        except BaseException:
            self._terminate(grace=2.0)
            raise

    def _wait_ready(self, log_offset: int) -> None:
        """Wait for the 'listens on' log line and a TCP accept on the port."""
        deadline = time.monotonic() + self.startup_timeout
        proc = self._proc
        assert proc is not None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AzuriteError(
                    f"Azurite exited with {proc.returncode} during start:\n{self.log_tail()}"
                )
            with open(self.log_path, "rb") as log:
                log.seek(log_offset)
                text = log.read().decode(errors="replace")
            if "EADDRINUSE" in text:
                raise AzuriteError(f"port {self.port} in use (EADDRINUSE):\n{self.log_tail()}")
            if _READY_MARKER in text and _port_accepts(self.host, self._require_port()):
                return
            time.sleep(0.05)
        raise AzuriteError(f"Azurite not ready after {self.startup_timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM: Azurite saves its metadata), SIGKILL after ``timeout``."""
        self._terminate(grace=timeout)

    def kill(self) -> None:
        """Crash-stop with SIGKILL: simulates a dead service.

        With ``location``, metadata changed in the last ~5 s (Azurite's
        autosave interval) may be lost; use ``stop()`` to keep everything.
        """
        self._terminate(grace=0.0)

    def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # The whole group (start_new_session), in case Azurite ever forks helpers.
            sig = signal.SIGTERM if grace > 0 else signal.SIGKILL
            _signal_group(proc.pid, sig)
            try:
                proc.wait(timeout=grace if grace > 0 else 5.0)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5.0)
        # No group signal after the wait: the pid is reaped and may be reused.
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------- clients
    @property
    def shared_key(self) -> dict[str, str]:
        """The SDK's dict form of the dev account's shared key credential."""
        return {"account_name": self.account_name, "account_key": self.account_key}

    def service_client(self, **kwargs: Any) -> Any:
        """BlobServiceClient; shared key unless ``credential=`` is given, CA trusted for HTTPS."""
        from azure.storage.blob import BlobServiceClient

        kwargs.setdefault("connection_verify", self.connection_verify)
        kwargs.setdefault("credential", self.shared_key)
        return BlobServiceClient(self.account_url, **kwargs)

    def container_client(self, name: str, **kwargs: Any) -> Any:
        """ContainerClient; shared key unless ``credential=`` is given, CA trusted for HTTPS."""
        from azure.storage.blob import ContainerClient

        kwargs.setdefault("connection_verify", self.connection_verify)
        kwargs.setdefault("credential", self.shared_key)
        return ContainerClient(self.account_url, name, **kwargs)

    def create_container(self, name: str, exist_ok: bool = True) -> Any:
        """Create ``name`` (3-63 chars, lowercase) and return its ContainerClient."""
        from azure.core.exceptions import ResourceExistsError

        client = self.container_client(name)
        try:
            client.create_container()
        except ResourceExistsError:
            if not exist_ok:
                raise
        return client

    def blob_names(self, container: str, prefix: str | None = None) -> list[str]:
        """Names of the committed blobs in ``container``."""
        with self.container_client(container) as client:
            return sorted(b.name for b in client.list_blobs(name_starts_with=prefix))

    def blob_md5(self, container: str, blob_name: str) -> str:
        """Hex MD5 of the blob's real bytes, streamed (not the stored Content-MD5).

        Why: the stored Content-MD5 is only what the uploader claimed; tests
        must compare what actually landed.
        """
        digest = hashlib.md5()
        with self.container_client(container) as client:
            stream = client.download_blob(blob_name, max_concurrency=1)
            for chunk in stream.chunks():
                digest.update(chunk)
        return digest.hexdigest()


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid`` (start_new_session), ignoring 'gone'."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for az in leftovers:
        az.kill()


# ------------------------------------------------------------------ fixtures
DEFAULT_CONTAINER = "ingest-test"


@pytest.fixture(scope="session")
def azurite_container() -> str:
    """Name of the container that ``azurite`` and ``azurite_https`` pre-create."""
    return DEFAULT_CONTAINER


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory, azurite_container: str) -> Iterator[Azurite]:
    """Session-wide HTTP, in-memory Azurite with ``azurite_container`` created."""
    az = Azurite(tmp_path_factory.mktemp("azurite-http"))
    with az:
        az.create_container(azurite_container)
        yield az


@pytest.fixture(scope="session")
def azurite_https(
    tmp_path_factory: pytest.TempPathFactory, azurite_container: str
) -> Iterator[Azurite]:
    """Session-wide HTTPS + ``--oauth basic`` Azurite (trustme CA at ``ca_bundle_path``)."""
    az = Azurite(tmp_path_factory.mktemp("azurite-https"), https=True)
    with az:
        az.create_container(azurite_container)
        yield az


AzuriteFactory = Callable[..., Azurite]


@pytest.fixture
def azurite_factory(tmp_path: Path) -> Iterator[AzuriteFactory]:
    """Start extra Azurite instances; all are stopped at test end.

    ``azurite_factory(persistent=True)`` uses ``tmp_path/"azurite-data"`` as
    ``--location``; other kwargs go to ``Azurite`` (``https=True``,
    ``location=...``, ``port=...``).
    """
    started: list[Azurite] = []

    def make(*, persistent: bool = False, start: bool = True, **kwargs: Any) -> Azurite:
        if persistent:
            kwargs.setdefault("location", tmp_path / f"azurite-data-{len(started)}")
        az = Azurite(Path(tempfile.mkdtemp(prefix="azurite-", dir=tmp_path)), **kwargs)
        started.append(az)
        return az.start() if start else az

    yield make
    for az in started:
        az.stop(timeout=10.0)
