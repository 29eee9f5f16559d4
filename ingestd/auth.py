"""The parent's side of storage: choosing credentials at startup.

The parent runs :func:`choose_auth` once before it serves: DefaultAzureCredential
first (managed or workload identity, no secrets), then the connection string,
then the account name and key. Each candidate must read the container's
properties within a bounded time. The winner's *name* goes to the children,
which build their own client (:mod:`ingestd.storageclient`): a credential
object does not cross a process boundary, and each uploader wants its own
connection pool anyway. The children never import this module.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from dataclasses import dataclass

from azure.core.exceptions import ResourceNotFoundError

from ingestd.config import Settings
from ingestd.storageclient import container_client
from ingestd.storageerrors import (
    ACCOUNT_KEY,
    CONNECTION_STRING,
    DEFAULT_CREDENTIAL,
    describe_error,
    one_line,
    status_and_code,
)

log = logging.getLogger(__name__)

STORAGE_SCOPE = "https://storage.azure.com/.default"
FALLBACK_KEYS = "APP_AZURE_CONNECTION_STRING, or APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY"


class AuthError(Exception):
    """No credential could reach the container: the service must not start."""


@dataclass(frozen=True)
class Outcome:
    """How one credential fared in the startup check."""

    method: str
    ok: bool
    reason: str = ""
    fatal: bool = False  # the container is reachable but wrong; fallbacks cannot help


def candidates(settings: Settings) -> list[tuple[str, str | None]]:
    """Each method in order of preference, with why it cannot be tried (or None)."""
    key_missing = [
        name
        for name, value in (
            ("APP_AZURE_ACCOUNT_NAME", settings.azure_account_name),
            ("APP_AZURE_ACCOUNT_KEY", settings.azure_account_key),
        )
        if not value
    ]
    return [
        (DEFAULT_CREDENTIAL, None),
        (
            CONNECTION_STRING,
            None if settings.azure_connection_string else "APP_AZURE_CONNECTION_STRING is not set",
        ),
        (ACCOUNT_KEY, None if not key_missing else " and ".join(key_missing) + " not set"),
    ]


def choose_auth(settings: Settings) -> str:
    """Return the first method that can read the container, or raise :class:`AuthError`.

    The whole check is bounded by ``APP_AZURE_STARTUP_TIMEOUT_S`` even when an
    endpoint accepts the connection and never answers: each attempt runs in a
    daemon thread that is abandoned when its share of the time is up.
    """
    deadline = time.monotonic() + settings.azure_startup_timeout_s
    usable = [(m, why) for m, why in candidates(settings)]
    report: list[str] = []
    remaining_attempts = sum(1 for _, why in usable if why is None)
    for method, why_not in usable:
        if why_not is not None:
            report.append(f"{method}: not configured ({why_not})")
            continue
        budget = max(1.0, (deadline - time.monotonic()) / remaining_attempts)
        remaining_attempts -= 1
        outcome = _bounded(settings, method, budget)
        if outcome.ok:
            fallback_note = f" after {'; '.join(report)}" if report else ""
            log.info("Azure auth: using %s%s", method, fallback_note)
            return method
        log.warning("Azure auth: %s failed: %s", method, outcome.reason)
        report.append(f"{method}: {outcome.reason}")
        if outcome.fatal:
            break
    raise AuthError(
        f"no usable Azure credentials for container {settings.azure_container!r} at "
        f"{settings.azure_account_url}. Tried: " + "; ".join(report) + ". "
        f"Fix the managed/workload identity (AZURE_CLIENT_ID, AZURE_TENANT_ID, "
        f"AZURE_FEDERATED_TOKEN_FILE, role 'Storage Blob Data Contributor') or set "
        f"{FALLBACK_KEYS}."
    )


TOKEN_STEP = "token"
CONTAINER_STEP = "container"


def _bounded(settings: Settings, method: str, seconds: float) -> Outcome:
    """Run :func:`check` in a daemon thread; give up on it after ``seconds``.

    The thread cannot be cancelled, only abandoned; the short timeouts of
    the startup clients make it end soon after by itself.
    """
    result: list[Outcome] = []
    step = [CONTAINER_STEP]  # what the check is waiting for, for the message

    def target() -> None:
        try:
            result.append(check(settings, method, step))
        except Exception as exc:  # the check reports every failure as an Outcome
            result.append(Outcome(method, False, describe_error(exc, method)))

    thread = threading.Thread(target=target, name=f"auth-check-{method}", daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if result:
        return result[0]
    if step[0] == TOKEN_STEP:
        reason = (
            f"no answer within {seconds:.0f} s from the token endpoint (it accepted "
            "the connection but did not answer): check the workload/managed "
            "identity endpoint and the egress to it"
        )
    elif method == CONNECTION_STRING:
        reason = (
            f"no answer within {seconds:.0f} s from the blob endpoint in "
            "APP_AZURE_CONNECTION_STRING (it accepted the connection but did not "
            "answer): check that endpoint and the network path to it"
        )
    else:
        reason = (
            f"no answer within {seconds:.0f} s from {settings.azure_account_url} (it "
            "accepted the connection but did not answer): check APP_AZURE_ACCOUNT_URL "
            "and the network path to it (private endpoint, firewall, DNS, proxy)"
        )
    return Outcome(method, False, reason)


def check(settings: Settings, method: str, step: list[str] | None = None) -> Outcome:
    """Can ``method`` read the container's properties?

    ``step[0]`` is kept up to date with what the check is waiting for
    (``TOKEN_STEP`` or ``CONTAINER_STEP``), so a caller that gives up on
    it can say which endpoint hung.
    """
    step = step if step is not None else [CONTAINER_STEP]
    if method == DEFAULT_CREDENTIAL and not settings.azure_account_url.startswith("https://"):
        return Outcome(method, False, "token credentials need an https:// APP_AZURE_ACCOUNT_URL")
    if method == ACCOUNT_KEY:
        reason = _bad_key(settings)
        if reason:
            return Outcome(method, False, reason)
    client = container_client(settings, method, startup=True)
    try:
        if method == DEFAULT_CREDENTIAL:
            step[0] = TOKEN_STEP
            try:
                client.credential.get_token(STORAGE_SCOPE)
            except Exception as exc:  # whatever the class: the token is what failed
                return Outcome(method, False, f"could not get a token: {one_line(exc)}")
            step[0] = CONTAINER_STEP
        client.get_container_properties()
    except ResourceNotFoundError as exc:
        return Outcome(
            method,
            False,
            f"container {settings.azure_container!r} does not exist ({status_and_code(exc)}); "
            "create it or fix APP_AZURE_CONTAINER",
            fatal=True,
        )
    except Exception as exc:
        return Outcome(method, False, describe_error(exc, method))
    finally:
        client.close()
    return Outcome(method, True)


def _bad_key(settings: Settings) -> str | None:
    assert settings.azure_account_key is not None
    try:
        base64.b64decode(settings.azure_account_key.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        return "APP_AZURE_ACCOUNT_KEY is not valid base64; copy the key from the storage account"
    return None
