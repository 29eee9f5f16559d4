"""Start-up: read the settings, fail fast, start the children, serve HTTP.

Exit codes (:mod:`ingestd.exitcodes`): 0 after a clean shutdown, 1 for an
unexpected error, 2 for a configuration error (including an HTTP port that
cannot be bound), 3 when no Azure credential works. Every exit is bounded in
time, even with children stuck on a frozen mount (see
:func:`ingestd.server.serve`). Kubernetes shows the last log line of a
crashed pod, so each failure ends with one line that says what to fix.
"""

from __future__ import annotations

import logging
import os
import sys

from ingestd import __version__, logs
from ingestd.config import ConfigError, load_settings
from ingestd.exitcodes import EXIT_AUTH, EXIT_CONFIG

log = logging.getLogger("ingestd")


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
    # Only the parent checks the API token: keep it out of the environment
    # every child inherits (the children get settings without it too).
    os.environ.pop("APP_API_TOKEN", None)
    log.info(
        "ingestd %s starting; incoming %s, staging %s, %d uploaders",
        __version__,
        settings.nfs_incoming_dir,
        settings.local_staging_root,
        settings.worker_concurrency,
    )
    from ingestd import md5pair

    if settings.azure_put_md5 and not md5pair.ACCELERATED:
        log.warning(
            "the MD5 accelerator (ingestd._md5pair) is not built: hashing with "
            "hashlib, which costs more CPU (see bench/RESULTS.md)"
        )
    # Imported here, not at the top: every spawned child re-imports this
    # module when the service runs as the console script, and only the
    # parent needs the HTTP server (about 75 MiB over the process tree).
    from ingestd import auth
    from ingestd.server import serve

    try:
        method = auth.choose_auth(settings)
    except auth.AuthError as exc:
        log.critical("cannot start: %s", exc)
        return EXIT_AUTH
    return serve(settings, method)


if __name__ == "__main__":
    sys.exit(main())
