"""What both sides say about storage: the auth methods' names, and what an error means.

The floor that :mod:`ingestd.auth` (the parent's credential choice and
startup check), :mod:`ingestd.storageclient` and :mod:`ingestd.blobupload`
(the uploaders' block upload) all import, so it imports no other ingestd
module. It holds the names of the auth methods (the parent sends the chosen
one to the children) and the classification of a failed request, used by
both sides: :func:`describe_error` (one line for the logs, without secrets;
the startup check and the uploaders) and :func:`outage_kind` (an outage,
which never counts against a file; the uploaders, who report it to the
parent's :mod:`ingestd.storagehealth`).
"""

from __future__ import annotations

from typing import TypeGuard

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

DEFAULT_CREDENTIAL = "DefaultAzureCredential"
CONNECTION_STRING = "connection string"
ACCOUNT_KEY = "account key"


def error_code(exc: BaseException) -> str:
    """The storage error code (``BlobAlreadyExists``), or "" when there is none.

    The storage SDK sets ``error_code`` on the errors it processes (its stubs do
    not declare it), as a string or an enum member; an error raised before any
    response (no token) has none.
    """
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def status_and_code(exc: HttpResponseError) -> str:
    """``403 AuthorizationFailure``: what an operator searches the docs for."""
    return f"{exc.status_code} {error_code(exc) or exc.reason}"


_WHAT_TO_CHECK = {
    DEFAULT_CREDENTIAL: "check the identity's token (tenant, audience https://storage.azure.com)",
    CONNECTION_STRING: "check the AccountKey in APP_AZURE_CONNECTION_STRING",
    ACCOUNT_KEY: "check APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY",
}
_REJECTED = {
    "AuthenticationFailed",
    "AuthorizationFailure",
    "InvalidAuthenticationInfo",
    "NoAuthenticationInformation",
}


def _rejected(exc: BaseException) -> TypeGuard[HttpResponseError]:
    """Storage refused the credential itself (classified by status and code, not class).

    A wrong shared key is 403 AuthenticationFailed on Azure and 403
    AuthorizationFailure on Azurite, or 400 InvalidAuthenticationInfo when
    Azurite also accepts OAuth; a token for the wrong audience or tenant is
    401/403 as a ClientAuthenticationError.
    """
    if not isinstance(exc, HttpResponseError):
        return False
    code = error_code(exc)
    return exc.status_code == 401 or (exc.status_code in (400, 403) and code in _REJECTED)


def describe_error(exc: BaseException, method: str | None = None) -> str:
    """One line that says what went wrong and what to look at, without secrets."""
    what_to_check = _WHAT_TO_CHECK.get(method or "", "check the credential")
    if _rejected(exc):
        rejected = f"storage rejected the {method or 'credential'} ({status_and_code(exc)})"
        return f"{rejected}: {what_to_check}"
    if isinstance(exc, ClientAuthenticationError) and not exc.status_code:
        return f"could not get a token: {one_line(exc.message)}"
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        what_to_do = "grant the identity a data role on the container"
        return f"access denied ({status_and_code(exc)}): {what_to_do}"
    if isinstance(exc, HttpResponseError) and exc.status_code:
        return f"storage error {status_and_code(exc)}: {_first_line(exc.message)}"
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return (
            f"cannot reach the blob endpoint: {_first_line(str(exc))}; check "
            "APP_AZURE_ACCOUNT_URL and the network path to it"
        )
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


OUTAGE_KINDS = ("refused", "timeout", "unreachable", "5xx", "throttled", "auth")
"""Why storage failed, as /v1/status and the logs say it."""


def outage_kind(exc: BaseException) -> str:
    """Which kind of storage outage ``exc`` is, or ``""`` if it is none.

    ``auth``: storage rejected the credential (401, 403), or no token could be
    had. ``5xx``/``throttled``: storage answered with a server error or asked
    us to slow down. ``refused``/``timeout``/``unreachable``: no answer at all.
    Anything else (a 400, a 404, an MD5 mismatch) is about the request or the
    file, not an outage.
    """
    if isinstance(exc, ClientAuthenticationError) and not exc.status_code:
        return "auth"
    status = getattr(exc, "status_code", None) or 0
    if isinstance(exc, HttpResponseError) and status:
        code = error_code(exc)
        if _rejected(exc) or status in (401, 403):
            return "auth"
        if status == 429 or code == "ServerBusy":
            return "throttled"
        if status >= 500:
            return "5xx"
        return "timeout" if status == 408 else ""
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        text = _chain_text(exc).lower()
        if "refused" in text:
            return "refused"
        if "timed out" in text or "timeout" in text:
            return "timeout"
        return "unreachable"
    return ""


def _chain_text(exc: BaseException) -> str:
    """The messages of ``exc`` and its causes: the SDK wraps the socket error."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " | ".join(parts)


def one_line(text: object, limit: int = 800) -> str:
    """A multi-line SDK message (DefaultAzureCredential lists every link) on one line."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())[:limit]


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""
