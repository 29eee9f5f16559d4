"""A loopback managed-identity token endpoint (App Service protocol) for tests.

Why: ingestd authenticates with DefaultAzureCredential. Tests must prove that
path end to end (token fetched, accepted by Azurite, refreshed, failures
surfaced) without any cloud and without ever touching IMDS. azure-identity
1.27 (through msal 1.39's ``_obtain_token_on_app_service``) uses this protocol
whenever ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are both set and
``IDENTITY_SERVER_THUMBPRINT`` is not:

    GET <IDENTITY_ENDPOINT>?api-version=2019-08-01&resource=https://storage.azure.com
    X-IDENTITY-HEADER: <IDENTITY_HEADER>
    Metadata: true

What msal parses from the JSON answer: ``access_token`` and ``expires_on``
(required; ``int(expires_on)``, so an epoch-seconds *string* or int both
work, a date string does not), ``resource`` and ``token_type`` (optional,
default "Bearer"). Anything else, or a body without both required keys,
becomes ``{"error": "invalid_scope", "error_description": "<statusCode>,
<message>"}`` and azure-identity raises CredentialUnavailableError.
A body that is not JSON raises JSONDecodeError from inside get_token.

The issued JWTs satisfy Azurite's ``--oauth basic`` check (iss prefix
``https://sts.windows.net/``, aud ``https://storage.azure.com`` [or with
trailing slash, the storage app id ``e406a681-...``, or
``https://<account>.blob.core.windows.net``], nbf/exp/iat present and
current). Azurite does not verify the signature, so HS256 with a random key.

Refresh facts (azure-core 1.41, msal 1.39, read in their source):
* ``BearerTokenCredentialPolicy`` asks for a new token when less than
  ``300 - jitter`` s remain, jitter random in [0, 60] s, re-drawn after each
  fetch (0 before the first). So a token of lifetime L >= 300 s is refreshed
  L-300 .. L-240 s after issue; with L < 240 s *every* request fetches one.
* msal's managed-identity cache treats a token with < 300 s left as expired,
  so those fetches really reach this server (no cache hit).
"""

from __future__ import annotations

import enum
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

LOOPBACK = "127.0.0.1"
TOKEN_PATH = "/msi/token"
STORAGE_RESOURCE = "https://storage.azure.com"
WRONG_AUDIENCE = "https://vault.azure.net"  # a real Azure audience Azurite rejects
DEFAULT_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
# The value that narrows DefaultAzureCredential to ManagedIdentityCredential
# (azure-identity 1.27 lower-cases it and matches "managedidentitycredential").
TOKEN_CREDENTIALS_MI = "ManagedIdentityCredential"


class Mode(enum.StrEnum):
    """How the endpoint answers; switch at runtime with ``TokenServer.mode``."""

    OK = "ok"  # a valid token for the requested resource
    REFUSE = "refuse"  # HTTP error (``refuse_status``, default 400) with error JSON
    WRONG_AUDIENCE = "wrong_audience"  # a well-formed token whose aud Azurite rejects
    HANG = "hang"  # read the request, never answer (until mode changes or stop)


@dataclass(frozen=True)
class TokenRequest:
    """One request the endpoint received (any mode, any header)."""

    at: float  # time.time()
    mode: Mode
    path: str
    params: Mapping[str, str]
    header_ok: bool
    status: int | None  # None while hung / when released without answer
    token_exp: int | None = None
    audience: str | None = None

    @property
    def resource(self) -> str | None:
        return self.params.get("resource")


def make_token(
    audience: str = STORAGE_RESOURCE,
    lifetime_s: float = 3600,
    tenant_id: str = DEFAULT_TENANT,
    now: float | None = None,
    **extra_claims: Any,
) -> tuple[str, int]:
    """Return ``(jwt, exp)`` shaped like an Entra ID v1 access token.

    Why nbf is 60 s in the past: Azurite compares with its own clock in
    milliseconds; a little slack avoids 'Lifetime validation failed' flakes.
    """
    issued = int(now if now is not None else time.time())
    exp = int(issued + lifetime_s)
    object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "ingestd-test-identity"))
    claims: dict[str, Any] = {
        "aud": audience,
        "iss": f"https://sts.windows.net/{tenant_id}/",
        "iat": issued - 60,
        "nbf": issued - 60,
        "exp": exp,
        "oid": object_id,
        "sub": object_id,
        "tid": tenant_id,
        "appid": "00000000-0000-0000-0000-00000000aaaa",
        "idtyp": "app",
        "ver": "1.0",
        "jti": uuid.uuid4().hex,
    }
    claims.update(extra_claims)
    return jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256"), exp


class TokenServer:
    """Loopback App Service managed-identity endpoint running in a thread.

    Usable by this process and by child processes (``env()``). Counts every
    request, checks ``X-IDENTITY-HEADER`` (401 JSON if wrong), and answers by
    ``mode``. Thread-safe; all attributes may be changed while it runs.

    Example::

        with TokenServer(lifetime_s=90) as ts:
            env = {**os.environ, **ts.env(ca_bundle=azurite_https.ca_bundle_path)}
            subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True)
            assert ts.calls >= 1
            ts.mode = "hang"
    """

    def __init__(
        self,
        *,
        lifetime_s: float = 3600,
        tenant_id: str = DEFAULT_TENANT,
        identity_header: str | None = None,
        mode: Mode | str = Mode.OK,
        refuse_status: int = 400,
    ) -> None:
        self.lifetime_s = lifetime_s
        self.tenant_id = tenant_id
        self.identity_header = identity_header or secrets.token_urlsafe(24)
        self.refuse_status = refuse_status
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._mode = Mode(mode)
        self._unhang = threading.Event()
        self._unhang.set()
        if self._mode is Mode.HANG:
            self._unhang.clear()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- mode
    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode | str) -> None:
        """Switch behaviour; leaving HANG releases hung requests (closed, no answer)."""
        new = Mode(value)
        with self._lock:
            self._mode = new
            if new is Mode.HANG:
                self._unhang.clear()
            else:
                self._unhang.set()

    def set_mode(self, mode: Mode | str, *, refuse_status: int | None = None) -> None:
        """``mode`` setter with the REFUSE status (400 and 500 behave differently)."""
        if refuse_status is not None:
            self.refuse_status = refuse_status
        self.mode = mode

    # ------------------------------------------------------------- counters
    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def calls(self) -> int:
        """Requests received, whatever the mode or header."""
        with self._lock:
            return len(self._requests)

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.status == 200)

    @property
    def bad_header_calls(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if not r.header_ok)

    def reset(self) -> None:
        """Forget recorded requests (mode and lifetime stay)."""
        with self._lock:
            self._requests.clear()

    def wait_for_calls(self, n: int, timeout: float = 10.0) -> bool:
        """True once ``calls >= n``; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.calls >= n:
                return True
            time.sleep(0.02)
        return self.calls >= n

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # ------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("TokenServer not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """Value for ``IDENTITY_ENDPOINT``."""
        return f"http://{LOOPBACK}:{self.port}{TOKEN_PATH}"

    def start(self) -> TokenServer:
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"owner": self})
        server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        server.daemon_threads = True
        server.block_on_close = False  # hung handlers must not block stop()
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="token-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release hung handlers (their clients see a closed connection)."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        self._unhang.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ env
    def env(
        self,
        ca_bundle: str | None = None,
        *,
        token_credentials: str = TOKEN_CREDENTIALS_MI,
    ) -> dict[str, str]:
        """Variables a child process needs to get its tokens here (and only here).

        ``AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential`` narrows
        DefaultAzureCredential to managed identity and turns off its IMDS
        probe; ``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER`` select the App
        Service source, so IMDS is never contacted. ``ca_bundle`` (the HTTPS
        Azurite's CA) goes into ``REQUESTS_CA_BUNDLE`` (what azure-core's
        requests transport reads, trust_env is on), ``CURL_CA_BUNDLE`` (its
        fallback) and ``SSL_CERT_FILE`` (OpenSSL default, for other clients).
        Merge over a scrubbed environment: ``netguard.child_env(ts.env(...))``.
        """
        env = {
            "IDENTITY_ENDPOINT": self.endpoint,
            "IDENTITY_HEADER": self.identity_header,
            "AZURE_TOKEN_CREDENTIALS": token_credentials,
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
        }
        if ca_bundle:
            env.update(
                REQUESTS_CA_BUNDLE=ca_bundle, CURL_CA_BUNDLE=ca_bundle, SSL_CERT_FILE=ca_bundle
            )
        return env

    def install_env(self, monkeypatch: pytest.MonkeyPatch, ca_bundle: str | None = None) -> None:
        """Apply ``env()`` to this process (for in-process DefaultAzureCredential).

        Also removes variables that would add another identity source.
        """
        for name in ("IDENTITY_SERVER_THUMBPRINT", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env(ca_bundle).items():
            monkeypatch.setenv(name, value)

    # ----------------------------------------------------------- responses
    def _answer(
        self, params: Mapping[str, str], header_ok: bool
    ) -> tuple[int, dict[str, Any], TokenRequest]:
        """Decide the reply for one request (everything but HANG)."""
        mode = self._mode
        now = time.time()
        base = dict(at=now, mode=mode, path=TOKEN_PATH, params=dict(params), header_ok=header_ok)
        if not header_ok:
            body = {"statusCode": 401, "message": "X-IDENTITY-HEADER missing or wrong"}
            return 401, body, TokenRequest(status=401, **base)
        resource = params.get("resource")
        if params.get("api-version") != "2019-08-01" or not resource:
            body = {
                "statusCode": 400,
                "message": "api-version=2019-08-01 and resource are required",
            }
            return 400, body, TokenRequest(status=400, **base)
        if mode is Mode.REFUSE:
            status = self.refuse_status
            body = {
                "statusCode": status,
                "message": f"token endpoint refused (test mode, {status})",
            }
            return status, body, TokenRequest(status=status, **base)
        audience = WRONG_AUDIENCE if mode is Mode.WRONG_AUDIENCE else resource
        token, exp = make_token(audience, self.lifetime_s, self.tenant_id, now=now)
        body = {
            "access_token": token,
            "expires_on": str(exp),  # App Service sends a string; msal int()s it
            "resource": resource,
            "token_type": "Bearer",
            "client_id": params.get("client_id", "00000000-0000-0000-0000-00000000aaaa"),
        }
        return 200, body, TokenRequest(status=200, token_exp=exp, audience=audience, **base)


class _Handler(BaseHTTPRequestHandler):
    owner: TokenServer  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence per-request stderr lines; requests are recorded instead."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.owner
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        header_ok = secrets.compare_digest(
            self.headers.get("X-IDENTITY-HEADER", ""), owner.identity_header
        )
        if url.path != TOKEN_PATH:
            self._send(404, {"statusCode": 404, "message": "not found"})
            return
        if owner.mode is Mode.HANG and header_ok:
            self._hang(params)
            return
        status, body, record = owner._answer(params, header_ok)
        owner._record(record)
        self._send(status, body)

    def _hang(self, params: Mapping[str, str]) -> None:
        """Hold the connection open without a byte of answer."""
        owner = self.owner
        owner._record(
            TokenRequest(
                at=time.time(),
                mode=Mode.HANG,
                path=TOKEN_PATH,
                params=dict(params),
                header_ok=True,
                status=None,
            )
        )
        owner._unhang.wait()
        self.close_connection = True  # released: close without answering

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    """A fresh TokenServer per test (mode OK, 1 h tokens); stopped at teardown."""
    with TokenServer() as server:
        yield server
