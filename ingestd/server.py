"""The HTTP server and the supervisor, run together until told to stop.

Kept apart from :mod:`ingestd.cli` on purpose: started as the ``ingestd``
console script, every spawned child re-imports the script's module, and so
``ingestd.cli``. Only the parent should pay for uvicorn and FastAPI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import uvicorn

from ingestd import api
from ingestd.config import Settings
from ingestd.exitcodes import EXIT_CONFIG, EXIT_INTERNAL
from ingestd.metrics import Metrics
from ingestd.sessions import Session, SessionNameError, new_session
from ingestd.supervisor import Supervisor

log = logging.getLogger("ingestd")


class Server(uvicorn.Server):
    """uvicorn, with SIGTERM turned into a drain instead of an immediate stop.

    The first signal stops new work and lets in-flight uploads finish (up to
    ``APP_SHUTDOWN_GRACE_S``) while the API keeps answering, with /readyz at
    503. A second signal stops at once. Signal handlers only set flags.

    SIGHUP (a closed terminal, some process managers) is one more such
    signal: uvicorn itself handles only SIGINT and SIGTERM, and SIGHUP's
    default action would kill the parent mid-upload, with no drain.
    """

    def __init__(self, config: uvicorn.Config, supervisor: Supervisor) -> None:
        super().__init__(config)
        self.supervisor = supervisor
        supervisor.on_drained = self._drained

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.supervisor.draining:  # asked twice: stop now
            self.should_exit = self.force_exit = True
            return
        self.supervisor.begin_drain()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's SIGINT/SIGTERM handlers, and SIGHUP to the same handler."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGHUP, self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def _drained(self) -> None:
        self.should_exit = True


def serve(settings: Settings, auth_method: str) -> NoReturn:
    """Bind the port, start the supervisor, serve HTTP; end the process when done.

    Every way out ends in ``os._exit`` within a bound, with the documented
    code: multiprocessing's exit hook joins every child without a timeout,
    and a child stuck in a hung NFS call would keep the process alive
    forever. The children are SIGKILLed (waited for briefly) first. The port
    is bound, and the autostart session checked, before any child exists,
    so those failures never meet a child at all.
    """
    code = EXIT_INTERNAL
    supervisor: Supervisor | None = None
    try:
        session = _autostart_session(settings)
        sock = _bind(settings)
        metrics = Metrics()  # fed by the supervisor, read from its snapshots
        supervisor = Supervisor(settings, auth_method, metrics)
        metrics.attach(supervisor.snapshot)
        ready: dict[str, Any] = {"ready": False}
        config = uvicorn.Config(
            api.create_app(supervisor, metrics, ready),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        server = Server(config, supervisor)
        supervisor.start()
        if session is not None:
            supervisor.start_session(session)
        ready["ready"] = True
        server.run(sockets=[sock])
        code = 0 if server.started else EXIT_INTERNAL
        if supervisor.exit_code is not None:
            code = supervisor.exit_code
    except StartupError as exc:
        log.critical("cannot start: %s", exc)
        code = EXIT_CONFIG
    except BaseException:  # whatever it was, the exit below must still happen
        log.exception("the server stopped on an unexpected error")
    finally:
        _stop(supervisor)
        os._exit(code)


class StartupError(Exception):
    """A setting that only shows itself unusable at start (port taken, bad session name)."""


def _autostart_session(settings: Settings) -> Session | None:
    if not settings.autostart:
        return None
    try:
        return new_session(settings.autostart_session or None)
    except SessionNameError as exc:
        raise StartupError(f"APP_AUTOSTART_SESSION is not usable: {exc}") from exc


def _bind(settings: Settings) -> socket.socket:
    """The listening socket, bound before any child starts (uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they
    # are TCP; without it every small response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.http_host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {settings.http_host}:{settings.http_port} ({exc.strerror}): "
            "check APP_HTTP_HOST and APP_HTTP_PORT, and that no other process holds the port"
        ) from exc
    sock.set_inheritable(True)
    return sock


def _stop(supervisor: Supervisor | None) -> None:
    """Stop the loop and kill the children, never raising: the exit must follow."""
    try:
        if supervisor is not None:
            supervisor.stop()
        log.info("stopped")
        if supervisor is not None and supervisor.exit_line:
            log.critical(supervisor.exit_line)  # the last line: what Kubernetes shows
        logging.shutdown()
    except BaseException:  # noqa: BLE001 - nothing may keep the process from exiting
        pass
