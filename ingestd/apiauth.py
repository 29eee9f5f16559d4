"""Bearer-token protection of the HTTP API (``APP_API_TOKEN``).

One dependency, :func:`require_token`, guards everything that changes state;
:class:`TokenFirst` checks the same header before a body is read.
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
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

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


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_MISSING = ("missing bearer token", 'Bearer realm="ingestd"')
_WRONG = ("wrong bearer token", 'Bearer realm="ingestd", error="invalid_token"')


def refusal(expected: bytes | None, token: str | None) -> tuple[str, str] | None:
    """Why a request carrying ``token`` must be refused: (reason, challenge), or None.

    ``expected`` is the configured token's digest; None means the API is open.
    """
    if expected is None:
        return None
    if not token:
        return _MISSING
    if not hmac.compare_digest(_digest(token), expected):
        return _WRONG
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as HTTPBearer reads it."""
    scheme, _, token = (authorization or "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


async def require_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
) -> None:
    """401 unless the request carries the configured bearer token; no-op when none is set."""
    token = credentials.credentials if credentials is not None else None
    why = refusal(request.app.state.api_token_digest, token)
    if why is not None:
        host = request.client.host if request.client else "?"
        raise _unauthorized(request.method, request.url.path, host, *why)


class TokenFirst:
    """Refuse a state-changing request without the token before its body is read.

    :func:`require_token` runs only once FastAPI has read and parsed the
    body, so a malformed body sent without a token would get 422 (and a
    description of what the body should be) instead of 401. This checks the
    header first, for every POST, PUT, PATCH and DELETE; the routes keep
    their dependency, which OpenAPI shows and a unit test requires.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in STATE_CHANGING:
            token = bearer_token(Headers(scope=scope).get("authorization"))
            why = refusal(scope["app"].state.api_token_digest, token)
            if why is not None:
                host = (scope.get("client") or ("?",))[0]
                refused = _unauthorized(scope["method"], scope["path"], host, *why)
                response = JSONResponse(
                    {"detail": refused.detail}, status_code=401, headers=refused.headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _unauthorized(method: str, path: str, host: str, reason: str, challenge: str) -> HTTPException:
    log.warning("refused %s %s from %s: %s", method, path, host, reason)
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
