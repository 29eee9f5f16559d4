"""The real parts of one campaign run and the faults applied to them.

One run owns: an in-memory Azurite (telemetry off), the blob proxy in front
of it, a FUSE mount standing in for the NFS share, one staging folder per
replica (a small tmpfs when the plan says so, so "staging full" is real), and
one or two ingestd process trees pointed at the proxy through env vars only.

The campaign itself never makes a syscall on the FUSE mount: writers and the
final check use the mount's backing folder, so a frozen mount can never
wedge the runner (the same rule as tests/test_hung_nfs.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support import devstore
from tests.support.azurite import Azurite
from tests.support.faults import tmpfs
from tests.support.fusefs import FreezableMount
from tests.support.proxy import BlobProxy
from tests.support.service import Service, base_env

CONTAINER = "campaign"
STAGING_TMPFS = "96m"
SIGTERM_EXIT_S = 30.0
"""How long a SIGTERMed service may take to exit (grace 2 s + drain); longer
is reported as a finding ("exit wedge"), then the tree is killed."""


@dataclass
class Replica:
    """One ingestd instance: its staging folder and every Service it ran as (restarts)."""

    index: int
    staging: Path
    env: dict[str, str]
    logs: Path
    services: list[Service] = field(default_factory=list)

    @property
    def current(self) -> Service:
        return self.services[-1]

    def start(self, session: str) -> Service:
        env = dict(self.env, APP_AUTOSTART="true", APP_AUTOSTART_SESSION=session)
        service = Service(env, self.logs / f"replica{self.index}-{len(self.services)}.log")
        self.services.append(service)
        service.start(timeout=90)
        return service

    def alive(self) -> bool:
        proc = self.current.proc
        return proc is not None and proc.poll() is None


@dataclass
class Rig:
    """Everything one run started; ``findings`` collects what is wrong but not a byte lost."""

    workdir: Path
    azurite: Azurite
    proxy: BlobProxy
    mount: FreezableMount
    replicas: list[Replica]
    session: str = ""
    date: str = ""
    sessions: dict[str, list[float]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    ballast: list[Path] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---------------------------------------------------------- folders
    @property
    def backing(self) -> Path:
        return self.mount.backing

    def incoming(self) -> Path:
        return self.backing / "incoming"

    # ---------------------------------------------------------- sessions
    def start_session(self, name: str) -> None:
        """Make ``name`` the active session on every replica; record when it was active.

        A session is taken as active from just before the first replica is
        asked until just after the last one answered for the next session.
        """
        started = self.now()
        if self.session:
            self.sessions[self.session][1] = float("inf")
        for replica in self.replicas:
            if replica.alive():
                with contextlib.suppress(Exception):
                    self.date = replica.current.start_session(name)["date_prefix"]
        if self.session:
            self.sessions[self.session][1] = self.now()
        self.sessions[name] = [started, float("inf")]
        self.session = name

    # ---------------------------------------------------------- faults
    def apply(self, kind: str, pick: float, replica_index: int) -> None:
        """Start one fault; ``clear`` ends the lasting ones."""
        replica = self.replicas[replica_index]
        self.faults[kind] += 1
        if kind == "kill_child":
            self._kill_child(replica, pick)
        elif kind == "kill_tree":
            replica.current.kill_tree()
            self.ensure_running(replica, why=None)
        elif kind == "sigterm":
            self._sigterm_and_restart(replica)
        elif kind == "freeze":
            self.mount.freeze()
        elif kind == "eio":
            self.mount.fail("read", errno.EIO, count=None)
        elif kind == "refuse":
            self.proxy.refuse()
        elif kind == "blackhole":
            self.proxy.blackhole()
        elif kind == "staging_full":
            self._fill_staging(replica)
        else:
            raise ValueError(kind)

    def clear(self) -> None:
        """End every lasting fault: thaw, no EIO, endpoint back, staging space back."""
        self.mount.thaw()
        self.mount.clear_faults()
        self.proxy.pass_through()
        for path in self.ballast:
            path.unlink(missing_ok=True)
        self.ballast.clear()

    def _kill_child(self, replica: Replica, pick: float) -> None:
        """SIGKILL one child of the tree, chosen by ``pick`` among the children sorted by pid."""
        if not replica.alive():
            return
        proc = replica.current.proc
        assert proc is not None
        try:
            children = sorted(c.pid for c in psutil.Process(proc.pid).children())
        except psutil.NoSuchProcess:
            return
        replica.current.track_pids()
        if children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(children[int(pick * len(children))], signal.SIGKILL)

    def _sigterm_and_restart(self, replica: Replica) -> None:
        service = replica.current
        if not replica.alive():
            self.ensure_running(replica, why="was not running at SIGTERM time")
            return
        service.terminate()
        try:
            code = service.wait_exit(SIGTERM_EXIT_S)
            if code != 0:
                self.findings.append(
                    f"replica {replica.index} exited with {code} on SIGTERM "
                    f"(log {service.log_path})"
                )
        except Exception:
            self.findings.append(
                f"replica {replica.index} did not exit within "
                f"{SIGTERM_EXIT_S:.0f} s of SIGTERM (log {service.log_path})"
            )
            service.kill_tree()
        self.ensure_running(replica, why=None)

    def _fill_staging(self, replica: Replica) -> None:
        """Take all but a few KiB of the replica's staging filesystem."""
        statvfs = os.statvfs(replica.staging)
        free = statvfs.f_bavail * statvfs.f_frsize
        ballast = replica.staging / f".campaign-ballast-{len(self.ballast)}"
        with open(ballast, "wb") as stream, contextlib.suppress(OSError):
            stream.truncate(0)
            os.posix_fallocate(stream.fileno(), 0, max(free - 64 * 1024, 0))
        self.ballast.append(ballast)

    def ensure_running(self, replica: Replica, why: str | None) -> None:
        """Restart a replica whose tree is gone (with the proxy passing: startup checks it)."""
        if replica.alive():
            return
        if why is not None:
            self.findings.append(f"replica {replica.index} {why} (log {replica.current.log_path})")
        with contextlib.suppress(Exception):
            replica.current.kill_tree()
        mode = self.proxy.mode
        self.proxy.pass_through()
        replica.start(self.session)
        if mode != "pass":
            self.proxy.set_mode(mode)

    # ---------------------------------------------------------- the end
    def idle(self) -> bool:
        """Every replica idle and nothing waiting in incoming or ``.processing``."""
        for replica in self.replicas:
            try:
                status = replica.current.status()
            except Exception:
                return False
            if status["in_flight"] or status["queue"]["depth"]:
                return False
        return not visible_files(self.incoming()) and not visible_files(
            self.backing / ".processing"
        )

    def stop_all(self) -> None:
        """SIGTERM every replica; a replica that does not exit in time is a finding, then killed."""
        for replica in self.replicas:
            service = replica.current
            if not replica.alive():
                continue
            service.terminate()
            try:
                service.wait_exit(SIGTERM_EXIT_S)
            except Exception:
                self.findings.append(
                    f"replica {replica.index} did not exit within "
                    f"{SIGTERM_EXIT_S:.0f} s of the final SIGTERM"
                )
        for replica in self.replicas:
            for service in replica.services:
                with contextlib.suppress(Exception):
                    service.kill_tree()
                service.http.close()

    def survivors(self) -> list[int]:
        found: list[int] = []
        for replica in self.replicas:
            for service in replica.services:
                found += service.survivors()
        return found


def visible_files(folder: Path) -> list[Path]:
    """Regular files below ``folder`` whose path has no dot component (bookkeeping, temp)."""
    if not folder.exists():
        return []
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


@contextlib.contextmanager
def rig(
    workdir: Path, replicas: int, small_staging: bool, settings: dict[str, str]
) -> Iterator[Rig]:
    """Start every part; tear all of it down on the way out, whatever happened."""
    with contextlib.ExitStack() as stack:
        azurite = Azurite(workdir / "azurite")
        stack.callback(azurite.stop)
        azurite.start()
        azurite.create_container(CONTAINER)
        proxy = stack.enter_context(BlobProxy(azurite.port))
        backing = workdir / "nfs"
        for folder in ("incoming", ".processing", ".failed"):
            (backing / folder).mkdir(parents=True)
        mount = FreezableMount.start(backing)
        stack.callback(mount.unmount)
        logs = workdir / "logs"
        logs.mkdir()
        built = Rig(workdir, azurite, proxy, mount, [])
        for index in range(replicas):
            staging = (
                stack.enter_context(tmpfs(STAGING_TMPFS))
                if small_staging
                else Path(tempfile.mkdtemp(prefix=f"staging{index}-", dir=workdir))
            )
            env = base_env(
                {
                    "APP_NFS_INCOMING_DIR": str(mount.path("incoming")),
                    "APP_NFS_PROCESSING_ROOT": str(mount.path(".processing")),
                    "APP_NFS_FAILED_ROOT": str(mount.path(".failed")),
                    "APP_LOCAL_STAGING_ROOT": str(staging),
                    "APP_AZURE_ACCOUNT_URL": proxy.account_url(azurite.account_name),
                    "APP_AZURE_CONTAINER": CONTAINER,
                    "APP_AZURE_CONNECTION_STRING": devstore.connection_string(
                        proxy.account_url(azurite.account_name)
                    ),
                    # One name per replica (they share this host's name); a restart
                    # of a replica keeps it, like a pod's container restart.
                    "APP_REPLICA_ID": f"campaign-replica-{index}",
                    "APP_LEASE_TIMEOUT_S": "8",  # > the stall timeout below
                    "APP_CHILD_STALL_TIMEOUT_S": "3",
                    "APP_LIVENESS_TIMEOUT_S": "30",
                    "APP_MIN_FILE_AGE_S": "0.5",
                    "APP_POLL_INTERVAL_S": "0.3",
                    "APP_SHUTDOWN_GRACE_S": "2",
                    "APP_AZURE_STARTUP_TIMEOUT_S": "20",
                    "APP_AZURE_MAX_BLOCK_SIZE": "4MiB",
                    "APP_AZURE_MAX_CONCURRENCY": "4",
                    **settings,
                }
            )
            built.replicas.append(Replica(index, staging, env, logs))
        # Stop services before the mount and tmpfs go (ExitStack runs in reverse).
        stack.callback(built.stop_all)
        stack.callback(built.clear)
        yield built
