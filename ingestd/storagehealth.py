"""What the parent knows about the blob endpoint, learnt from the uploaders' results.

An outage of storage is not a stuck child: the uploaders keep beating while
they wait on the network (liveness stays green, a restart would cure
nothing), and each failed request comes back as a ``Failed`` with the kind
of failure. This is where those are turned into what operators read:
``/v1/status`` ``storage`` and the ``ingestd_storage_*`` gauges.

Two problems are told apart, because they call for different people:

* ``unreachable``: no answer, refused, timing out, 5xx, throttled. Retried
  with the outage backoff for as long as it lasts.
* ``auth_failing``: storage answers but rejects the credential (401/403), or
  no token can be had. Retried the same way, but if it lasts
  ``APP_AUTH_FAILURE_EXIT_S`` the service stops and exits with code 3: a
  revoked role or a rotated key does not heal by itself, and a pod in
  CrashLoopBackOff whose startup check names the keys is what operators expect.

Any request that works (``StorageOk``, ``Done``) clears both.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OK, UNREACHABLE, AUTH_FAILING = "ok", "unreachable", "auth_failing"


@dataclass
class StorageHealth:
    state: str = OK
    reason: str = ""  # refused, timeout, unreachable, 5xx, throttled, auth
    error: str = ""
    since: float | None = None  # wall clock: when the current problem began
    since_mono: float | None = None
    auth_since_mono: float | None = None  # first auth failure since the last success
    failures: int = 0  # failed attempts during the current problem
    last_ok: float | None = None  # wall clock of the last request known to work

    def failed(self, kind: str, error: str, mono: float, wall: float) -> None:
        """An attempt failed because of storage (``kind`` from ``storageerrors.outage_kind``)."""
        state = AUTH_FAILING if kind == "auth" else UNREACHABLE
        if state != self.state:
            self.state, self.since, self.since_mono, self.failures = state, wall, mono, 0
            if state == AUTH_FAILING:
                log.error("blob storage rejects the credential: %s", error)
            else:
                log.warning("blob storage unreachable (%s): %s", kind, error)
        if kind == "auth" and self.auth_since_mono is None:
            self.auth_since_mono = mono
        self.reason, self.error = kind, error
        self.failures += 1

    def ok(self, mono: float, wall: float) -> None:
        """A request worked: the endpoint answers and accepts the credential."""
        if self.state != OK and self.since_mono is not None:
            log.info(
                "blob storage works again after %.0f s (%s; %d failed attempts)",
                mono - self.since_mono,
                self.state.replace("_", " "),
                self.failures,
            )
        self.state, self.reason, self.error, self.failures = OK, "", "", 0
        self.since = self.since_mono = self.auth_since_mono = None
        self.last_ok = wall

    def auth_failing_for(self, mono: float) -> float:
        return 0.0 if self.auth_since_mono is None else mono - self.auth_since_mono

    def view(self, mono: float, auth_exit_s: float) -> dict[str, Any]:
        """The ``storage`` section of ``/v1/status``."""
        failing_for = self.auth_failing_for(mono)
        return {
            "state": self.state,
            "reachable": self.state != UNREACHABLE,
            "reason": self.reason or None,
            "error": self.error or None,
            "since": _iso(self.since),
            "for_s": round(mono - self.since_mono, 1) if self.since_mono is not None else None,
            "failed_attempts": self.failures,
            "auth_exit_in_s": round(max(0.0, auth_exit_s - failing_for), 1)
            if self.auth_since_mono is not None
            else None,
            "last_ok": _iso(self.last_ok),
        }


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="seconds")
