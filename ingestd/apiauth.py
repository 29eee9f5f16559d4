"""Bearer-token protection of the HTTP API (``APP_API_TOKEN``).

One dependency, :func:`require_token`, guards everything that changes state.
An endpoint gets it by being declared on the ``control`` router in
:mod:`ingestd.api` (or, anywhere else, with
``dependencies=[Depends(require_token)]``); a unit test fails if a POST, PUT,
PATCH or DELETE route lacks it. ``/healthz`` and ``/readyz`` never require it:
the kubelet calls them and carries no token.

The token is compared in constant time, over SHA-256 digests so that not even
its length leaks, and it is never echoed: not in a response, a log line (it is
one of the redactor's secrets) or a metric.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ingestd.config import Settings

log = logging.getLogger("ingestd.api")

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APP_API_TOKEN",
    description="`Authorization: Bearer <APP_API_TOKEN>`. Required on POST /v1/... when "
    "APP_API_TOKEN is set; on /v1/status and /metrics too with "
    "APP_API_TOKEN_FOR_READS=true. Never on /healthz and /readyz.",
)
"""Reads the header and declares the scheme in OpenAPI; the check is ours."""


def install(app: FastAPI, settings: Settings) -> None:
    """Give ``app`` the expected token's digest (None: the API is open)."""
    token = settings.api_token
    app.state.api_token_digest = _digest(token.get_secret_value()) if token else None


def _digest(token: str) -> bytes:
    # Starlette decodes header bytes as Latin-1; encoding back gives the bytes
    # sent. The configured token is printable ASCII (see Settings), the same bytes.
    return hashlib.sha256(token.encode("latin-1", errors="replace")).digest()


async def require_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
) -> None:
    """401 unless the request carries the configured bearer token; no-op when none is set."""
    expected: bytes | None = request.app.state.api_token_digest
    if expected is None:
        return
    if credentials is None:
        raise _unauthorized(request, "missing bearer token", 'Bearer realm="ingestd"')
    if not hmac.compare_digest(_digest(credentials.credentials), expected):
        raise _unauthorized(
            request, "wrong bearer token", 'Bearer realm="ingestd", error="invalid_token"'
        )


def _unauthorized(request: Request, reason: str, challenge: str) -> HTTPException:
    client = request.client.host if request.client else "?"
    log.warning("refused %s %s from %s: %s", request.method, request.url.path, client, reason)
    return HTTPException(
        401,
        f"{reason}: send Authorization: Bearer <APP_API_TOKEN>",
        headers={"WWW-Authenticate": challenge},
    )


def is_loopback(host: str) -> bool:
    """True if ``host`` can only be reached from this machine (no DNS lookup)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log_protection(settings: Settings) -> None:
    """Say at startup whether the control API is protected; warn if it is open to others."""
    where = f"{settings.http_host}:{settings.http_port}"
    if settings.api_token is not None:
        reads = "too" if settings.api_token_for_reads else "not (APP_API_TOKEN_FOR_READS=false)"
        log.info(
            "control API protected: POST /v1/... require the APP_API_TOKEN bearer token; "
            "/v1/status and /metrics %s; /healthz and /readyz open",
            reads,
        )
    elif is_loopback(settings.http_host):
        log.info("control API not protected (APP_API_TOKEN unset); it listens on %s only", where)
    else:
        log.warning(
            "control API NOT protected: APP_API_TOKEN is unset and it listens on %s, "
            "so anyone who reaches the port can start and stop sessions",
            where,
        )
