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
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from ingestd import api
from ingestd.cli import EXIT_CONFIG
from ingestd.config import Settings
from ingestd.sessions import SessionNameError, new_session
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


def serve(settings: Settings, auth_method: str) -> int:
    """Start the supervisor and the HTTP server; stop both on the way out."""
    supervisor = Supervisor(settings, auth_method)
    ready: dict[str, Any] = {"ready": False}
    app = api.create_app(supervisor, ready)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = Server(config, supervisor)
    supervisor.start()
    try:
        if settings.autostart:
            _autostart(supervisor, settings.autostart_session)
        ready["ready"] = True
        server.run()
    finally:
        supervisor.stop()
        log.info("stopped")
        logging.shutdown()
    # multiprocessing's exit hook joins children without a timeout; one stuck
    # in a hung NFS call would keep us from ever exiting. They are killed.
    os._exit(0 if server.started else 1)


def _autostart(supervisor: Supervisor, name: str) -> None:
    try:
        supervisor.start_session(new_session(name or None))
    except SessionNameError as exc:
        log.critical("APP_AUTOSTART_SESSION is not usable: %s", exc)
        raise SystemExit(EXIT_CONFIG) from exc
