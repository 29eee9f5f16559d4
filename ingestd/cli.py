"""Start-up: read the settings, fail fast, start the children, serve HTTP.

Exit codes: 0 after a clean shutdown, 2 for a configuration error, 3 when no
Azure credential works. Kubernetes shows the last log line of a crashed pod,
so each failure ends with one line that says what to fix.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import uvicorn

from ingestd import __version__, api, blobstore, logs
from ingestd.config import ConfigError, Settings, load_settings
from ingestd.sessions import SessionNameError, new_session
from ingestd.supervisor import Supervisor

log = logging.getLogger("ingestd")

EXIT_CONFIG = 2
EXIT_AUTH = 3


class Server(uvicorn.Server):
    """uvicorn, with SIGTERM turned into a drain instead of an immediate stop.

    The first signal stops new work and lets in-flight uploads finish (up to
    ``APP_SHUTDOWN_GRACE_S``) while the API keeps answering, with /readyz at
    503. A second signal stops at once. Signal handlers only set flags.
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

    def _drained(self) -> None:
        self.should_exit = True


def main() -> int:
    """Run the service until it is told to stop; return the exit code."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        fmt = os.environ.get("APP_LOG_FORMAT", "text")
        logs.configure(fmt if fmt in ("json", "text") else "text", "INFO", "api")
        log.critical("cannot start: %s", exc)
        return EXIT_CONFIG
    logs.configure(settings.log_format, settings.log_level, "api", settings.secrets())
    log.info("ingestd %s starting; incoming %s, staging %s, %d uploaders", __version__,
             settings.nfs_incoming_dir, settings.local_staging_root, settings.worker_concurrency)
    try:
        method = blobstore.choose_auth(settings)
    except blobstore.AuthError as exc:
        log.critical("cannot start: %s", exc)
        return EXIT_AUTH
    return serve(settings, method)


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


if __name__ == "__main__":
    sys.exit(main())
