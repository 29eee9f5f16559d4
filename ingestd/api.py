"""The HTTP API: session control, status and probes.

Handlers only read or flip the supervisor's in-memory state (they read it
through a :class:`~ingestd.status.Snapshot`). None of them touches a file or
waits on a child, so they answer in milliseconds even while every child is
stuck on a frozen mount.

Routes that change state live on the ``control`` router, which requires the
bearer token (:func:`ingestd.apiauth.require_token`); a new ``POST /v1/...``
declared there is protected without another line. The read routes (status,
metrics) are on ``reads``, protected only with ``APP_API_TOKEN_FOR_READS``;
the probes are on the app itself and always open.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingestd import __version__, apiauth
from ingestd.apiauth import require_token
from ingestd.metrics import CONTENT_TYPE, Metrics
from ingestd.sessions import SessionNameError, new_session
from ingestd.status import health, rate_view, status_view
from ingestd.supervisor import Supervisor

MAX_BODY_BYTES = 16 * 1024
"""A start request is a few dozen bytes; anything much larger is a mistake or an attack."""


class StartRequest(BaseModel):
    """Body of ``POST /v1/watch/start``; the body itself is optional."""

    model_config = ConfigDict(extra="forbid")

    session_name: str | None = Field(
        None, description="Blob folder name; blank or missing means a generated one."
    )


class LimitsRequest(BaseModel):
    """Body of ``POST /v1/limits``."""

    model_config = ConfigDict(extra="forbid")

    max_mbps: float = Field(
        ...,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="The pod's total upload rate cap in MB/s (10^6 bytes/s); 0 removes it.",
    )


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped (``\\u00e9``), so any text renders.

    A file name that is not valid UTF-8 reaches Python as lone surrogates
    (``\\udcff``), which UTF-8 cannot encode: the default response would fail
    with a 500 on every ``/v1/status`` for as long as that name is in
    ``last_error`` or in flight. Escaped, it is valid JSON that clients decode
    to the same strings.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


class StartResponse(BaseModel):
    date_prefix: str
    session_name: str
    encoded_session: str


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before they are read whole."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(self.limit, send)
            return
        received = 0

        async def limited_receive() -> Message:
            """Count a body sent without Content-Length (chunked) as it arrives.

            An HTTPException is what FastAPI passes through from body reading;
            anything else it turns into a bare 400.
            """
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _too_large(limit: int, send: Send) -> None:
    response = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(
    supervisor: Supervisor, metrics: Metrics, ready: dict[str, Any] | None = None
) -> FastAPI:
    """The FastAPI app over a running :class:`Supervisor` and the metrics it feeds.

    ``ready`` is a small dict the CLI flips to ``{"ready": True}`` once
    startup has finished.
    """
    readiness = ready if ready is not None else {"ready": True}
    app = FastAPI(title="ingestd", version=__version__, default_response_class=AsciiJSONResponse)
    app.add_middleware(BodyLimit)
    app.add_middleware(apiauth.TokenFirst)  # outermost: a refused request's body is never read
    apiauth.install(app, supervisor.settings)
    apiauth.log_protection(supervisor.settings)
    control = APIRouter(dependencies=[Depends(require_token)])
    protect_reads = supervisor.settings.api_token_for_reads
    reads = APIRouter(dependencies=[Depends(require_token)] if protect_reads else [])

    @app.exception_handler(SessionNameError)
    async def bad_session(_: Request, exc: SessionNameError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: the supervisor ticks and every child slot has a fresh heartbeat."""
        ok, reason = health(supervisor.snapshot())
        body: dict[str, Any] = {"ok": ok}
        if not ok:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: startup finished and no shutdown has begun."""
        is_ready = bool(readiness.get("ready")) and not supervisor.draining
        body: dict[str, Any] = {"ready": is_ready}
        if supervisor.draining:
            body["reason"] = "shutting down"
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @control.post("/v1/watch/start", response_model=StartResponse)
    async def watch_start(body: StartRequest | None = None) -> StartResponse:
        """Start scanning under a session; the blob prefix is ``<date>/<encoded>/``."""
        session = new_session(body.session_name if body else None)
        session = supervisor.start_session(session)
        return StartResponse(
            date_prefix=session.date,
            session_name=session.name,
            encoded_session=session.encoded,
        )

    @control.post("/v1/watch/stop")
    async def watch_stop() -> dict[str, bool]:
        """Stop scanning; queued and in-flight files still finish."""
        supervisor.stop_session()
        return {"enabled": False}

    @reads.get("/v1/limits")
    async def limits() -> dict[str, Any]:
        """The upload rate cap in force and how it is shared now."""
        return rate_view(supervisor.snapshot().rate)

    @control.post("/v1/limits")
    async def set_limits(body: LimitsRequest) -> dict[str, Any]:
        """Change the upload rate cap without a restart (until the next restart)."""
        return rate_view(supervisor.set_rate_cap(body.max_mbps))

    @reads.get("/v1/status", response_class=AsciiJSONResponse)
    async def status() -> AsciiJSONResponse:
        # The response itself, not a dict: FastAPI would walk every value of a
        # returned dict through jsonable_encoder first, which is most of the
        # request's cost, and the status is plain JSON types already.
        return AsciiJSONResponse(status_view(supervisor.snapshot()))

    @reads.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format, rendered from the supervisor's state."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(control)
    app.include_router(reads)
    return app
