"""Azure Blob Storage: choosing credentials at startup, and uploading a file.

The parent runs :func:`choose_auth` once before it serves: DefaultAzureCredential
first (managed or workload identity, no secrets), then the connection string,
then the account name and key. Each candidate must read the container's
properties within a bounded time. The winner's *name* goes to the children,
which build their own client: a credential object does not cross a process
boundary, and each uploader wants its own connection pool anyway.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobType, ContainerClient, ContentSettings
from azure.storage.blob._shared.policies import ExponentialRetry

from ingestd.config import Settings

log = logging.getLogger(__name__)

DEFAULT_CREDENTIAL = "DefaultAzureCredential"
CONNECTION_STRING = "connection string"
ACCOUNT_KEY = "account key"

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


# Clients


def _transport_options(settings: Settings, startup: bool) -> dict:
    """Timeouts and retries for a client.

    The SDK's default retry waits 15 s, then more, before a network error
    surfaces; uploads would stop beating for over a minute and be killed as
    stalled. Short, few retries here; the supervisor retries the file.
    """
    if startup:
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=0)
        return {"retry_policy": retry, "connection_timeout": 5, "read_timeout": 10}
    retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=3)
    return {
        "retry_policy": retry,
        "connection_timeout": 10,
        "read_timeout": 60,
        "max_block_size": settings.azure_max_block_size,
        "max_single_put_size": settings.azure_max_single_put_size,
    }


def container_client(settings: Settings, method: str, startup: bool = False) -> ContainerClient:
    """A client for the configured container using ``method``'s credential."""
    options = _transport_options(settings, startup)
    if method == DEFAULT_CREDENTIAL:
        from azure.identity import DefaultAzureCredential

        return ContainerClient(
            settings.azure_account_url,
            settings.azure_container,
            credential=DefaultAzureCredential(),
            **options,
        )
    if method == CONNECTION_STRING:
        assert settings.azure_connection_string is not None
        return ContainerClient.from_connection_string(
            settings.azure_connection_string.get_secret_value(),
            settings.azure_container,
            **options,
        )
    assert settings.azure_account_name and settings.azure_account_key is not None
    credential = {
        "account_name": settings.azure_account_name,
        "account_key": settings.azure_account_key.get_secret_value(),
    }
    return ContainerClient(
        settings.azure_account_url, settings.azure_container, credential=credential, **options
    )


# Startup check


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
        outcome = _bounded(lambda m=method: check(settings, m), budget, method)
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


def _bounded(fn: Callable[[], Outcome], seconds: float, method: str) -> Outcome:
    result: list[Outcome] = []

    def target() -> None:
        try:
            result.append(fn())
        except Exception as exc:  # the check reports every failure as an Outcome
            result.append(Outcome(method, False, describe_error(exc)))

    thread = threading.Thread(target=target, name=f"auth-check-{method}", daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if result:
        return result[0]
    return Outcome(method, False, f"no answer within {seconds:.0f} s (endpoint hangs?)")


def check(settings: Settings, method: str) -> Outcome:
    """Can ``method`` read the container's properties?"""
    if method == DEFAULT_CREDENTIAL and not settings.azure_account_url.startswith("https://"):
        return Outcome(method, False, "token credentials need an https:// APP_AZURE_ACCOUNT_URL")
    if method == ACCOUNT_KEY:
        reason = _bad_key(settings)
        if reason:
            return Outcome(method, False, reason)
    client = container_client(settings, method, startup=True)
    try:
        if method == DEFAULT_CREDENTIAL:
            client.credential.get_token(STORAGE_SCOPE)
        client.get_container_properties()
    except ResourceNotFoundError as exc:
        return Outcome(
            method,
            False,
            f"container {settings.azure_container!r} does not exist ({_code(exc)}); "
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


def _code(exc: HttpResponseError) -> str:
    code = exc.error_code or exc.reason
    return f"{exc.status_code} {getattr(code, 'value', code)}"


_WHAT_TO_CHECK = {
    DEFAULT_CREDENTIAL: "check the identity's token (tenant, audience https://storage.azure.com)",
    CONNECTION_STRING: "check the AccountKey in APP_AZURE_CONNECTION_STRING",
    ACCOUNT_KEY: "check APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY",
}
_REJECTED = {"AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo",
             "NoAuthenticationInformation"}


def describe_error(exc: BaseException, method: str | None = None) -> str:
    """One line that says what went wrong and what to look at, without secrets."""
    what_to_check = _WHAT_TO_CHECK.get(method or "", "check the credential")
    error_code = getattr(exc, "error_code", None)
    code = str(getattr(error_code, "value", error_code) or "")
    if isinstance(exc, HttpResponseError) and (
        exc.status_code == 401 or (exc.status_code == 403 and code in _REJECTED)
    ):
        return f"storage rejected the {method or 'credential'} ({_code(exc)}): {what_to_check}"
    if isinstance(exc, ClientAuthenticationError) and not exc.status_code:
        return f"could not get a token: {_squash(exc.message)}"
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        return f"access denied ({_code(exc)}): grant the identity a data role on the container"
    if isinstance(exc, HttpResponseError) and exc.status_code:
        return f"storage error {_code(exc)}: {_first_line(exc.message)}"
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return f"cannot reach the blob endpoint: {_first_line(str(exc))}"
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


def is_outage(exc: BaseException) -> bool:
    """True when the endpoint was unreachable, overloaded or refused our credential.

    Such failures say nothing about the file, so they must not count
    towards its attempts (an outage is not a poison file).
    """
    if isinstance(exc, (ServiceRequestError, ServiceResponseError, ClientAuthenticationError)):
        return True
    status = getattr(exc, "status_code", None) or 0
    return isinstance(exc, HttpResponseError) and (status >= 500 or status in (401, 403, 408, 429))


def _squash(text: object, limit: int = 800) -> str:
    """A multi-line SDK message (DefaultAzureCredential lists every link) on one line."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())[:limit]


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


# Upload


def upload_file(
    client: ContainerClient,
    settings: Settings,
    blob_name: str,
    path: str,
    size: int,
    md5: bytes,
    progress: Callable[[int, int | None], None],
) -> None:
    """Upload ``path`` as a Block Blob named ``blob_name``, replacing any previous one.

    Blocks go in parallel (``APP_AZURE_MAX_CONCURRENCY``) with a Content-MD5
    each, and the whole file's MD5, computed while staging, is stored on the
    blob so anyone can check it later.
    """
    blob = client.get_blob_client(blob_name)
    with open(path, "rb") as stream:
        blob.upload_blob(
            stream,
            blob_type=BlobType.BLOCKBLOB,
            length=size,
            overwrite=True,
            max_concurrency=settings.azure_max_concurrency,
            validate_content=True,
            content_settings=ContentSettings(content_md5=bytearray(md5)),
            progress_hook=progress,
        )
