"""Azure auth end to end: managed identity first, then the fallbacks, and fail fast.

Every test starts the real ``python -m ingestd`` against a real Azurite
(HTTPS with ``--oauth basic``) and a loopback managed-identity token endpoint
(``tests/support/tokens.py``), all on 127.0.0.1. "Managed identity
unavailable" is the token endpoint refusing, hanging, or a closed loopback
port; never an unconfigured chain (which would probe IMDS). Each service runs
with the network guard's child environment, so a child that tried to leave
loopback fails the test.

The startup check is bounded by ``APP_AZURE_STARTUP_TIMEOUT_S`` (10 s here);
failing runs must exit within it plus a margin for interpreter start, and
every run's output is checked for the account key, the connection string,
the identity header and any token.
"""

from __future__ import annotations

import importlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from tests.support.service import Layout, Service, base_env, run_once, wait_until, write_random

if TYPE_CHECKING:
    from tests.support.azurite import Azurite
    from tests.support.tokens import TokenServer

pytest_plugins = ["tests.support.tokens"]


def tokens() -> ModuleType:
    """tests.support.tokens, imported only once pytest has registered it as a plugin.

    A module-level import would run first and stop pytest from rewriting its asserts.
    """
    return importlib.import_module("tests.support.tokens")


MiB = 1024 * 1024
BOUND_S = 10.0  # APP_AZURE_STARTUP_TIMEOUT_S in these tests
MARGIN_S = 8.0  # interpreter start, imports, settings, exit (about 1.5 s measured)
FALLBACK_KEYS = ("APP_AZURE_CONNECTION_STRING", "APP_AZURE_ACCOUNT_NAME", "APP_AZURE_ACCOUNT_KEY")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.")
WRONG_KEY = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ=="


# ------------------------------------------------------------------ helpers
@pytest.fixture
def issued_tokens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token the token server hands out, to look for in the logs."""
    issued: list[str] = []
    module = tokens()
    real = module.make_token

    def recording(*args: Any, **kwargs: Any) -> tuple[str, int]:
        token, exp = real(*args, **kwargs)
        issued.append(token)
        return token, exp

    monkeypatch.setattr(module, "make_token", recording)
    return issued


class Secrets:
    """What must never appear in output: configured secrets, the identity header, tokens."""

    def __init__(self, azurite: Azurite, token_server: TokenServer, issued: list[str]) -> None:
        self.values = [
            azurite.account_key,
            azurite.connection_string,
            WRONG_KEY,
            token_server.identity_header,
        ]
        self.issued = issued

    def assert_absent(self, output: str) -> None:
        for index, value in enumerate(self.values + self.issued):
            assert value not in output, f"secret or token #{index} leaked into the logs"
        match = JWT.search(output)
        assert match is None, f"something shaped like a token is in the logs: {match.group(0)}"


@pytest.fixture
def secrets(azurite_https: Azurite, token_server: TokenServer, issued_tokens: list[str]) -> Secrets:
    return Secrets(azurite_https, token_server, issued_tokens)


EnvFactory = Callable[..., dict[str, str]]


@pytest.fixture
def service_env(
    layout: Layout,
    azurite_https: Azurite,
    azurite_container: str,
    netguard_child_env: Callable[..., dict[str, str]],
) -> EnvFactory:
    """``service_env(identity_env, APP_X=...)``: a guarded child env for the HTTPS Azurite.

    No fallback secrets unless given; the CA bundle is trusted; one uploader.
    """

    def make(identity: dict[str, str], **app: str) -> dict[str, str]:
        ca = azurite_https.ca_bundle_path
        assert ca is not None
        extra = {
            **layout.env(),
            "APP_AZURE_ACCOUNT_URL": azurite_https.account_url,
            "APP_AZURE_CONTAINER": azurite_container,
            "APP_AZURE_STARTUP_TIMEOUT_S": str(BOUND_S),
            "APP_WORKER_CONCURRENCY": "1",
            "REQUESTS_CA_BUNDLE": ca,
            "CURL_CA_BUNDLE": ca,
            "SSL_CERT_FILE": ca,
            **identity,
            **app,
        }
        return netguard_child_env(extra, base=base_env())

    return make


def closed_port_identity() -> dict[str, str]:
    """Managed identity configured, but its endpoint is a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {
        "IDENTITY_ENDPOINT": f"http://127.0.0.1:{port}{tokens().TOKEN_PATH}",
        "IDENTITY_HEADER": "closed-port-header",
        "AZURE_TOKEN_CREDENTIALS": tokens().TOKEN_CREDENTIALS_MI,
    }


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Service]]:
    """Start real services from an env; each is killed at the end and must leave no process."""
    started: list[Service] = []

    def start(env: dict[str, str]) -> Service:
        service = Service(env, tmp_path / f"ingestd-{len(started)}.log")
        started.append(service)
        return service.start(timeout=BOUND_S + 30)

    yield start
    for service in started:
        service.stop()
        assert not service.survivors(), f"processes left behind: {service.survivors()}"


def upload_one(
    service: Service, layout: Layout, azurite: Azurite, container: str, size: int = 3 * MiB
) -> str:
    """Drop one file, wait for it, and check the blob's real bytes; return the blob name."""
    session = service.start_session(f"auth-{time.monotonic_ns()}")
    md5 = write_random(layout.incoming / "one.bin", size)
    service.wait_processed(1, timeout=60)
    blob = f"{session['date_prefix']}/{session['encoded_session']}/one.bin"
    assert azurite.blob_md5(container, blob) == md5
    return blob


def run_failing(env: dict[str, str], label: str) -> tuple[str, float]:
    """Run the service expecting exit 3 within the bound; return its output and seconds."""
    started = time.monotonic()
    result = run_once(env, timeout=BOUND_S + 40)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    print(
        f"[figures] {label}: exit {result.returncode} after {elapsed:.2f} s "
        f"(bound {BOUND_S:.0f} s + {MARGIN_S:.0f} s margin)"
    )
    assert result.returncode == 3, output
    assert elapsed < BOUND_S + MARGIN_S, f"took {elapsed:.1f} s:\n{output}"
    assert "Traceback" not in output
    return output, elapsed


def final_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "cannot start:" in line]
    assert lines, output
    return lines[-1]


# ------------------------------------------------------- identity works
@pytest.mark.timeout(90)
def test_managed_identity_uploads_without_any_secret(
    services: Callable[[dict[str, str]], Service],
    service_env: EnvFactory,
    layout: Layout,
    azurite_https: Azurite,
    azurite_container: str,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    env = service_env(
        token_server.env(), APP_AZURE_MAX_BLOCK_SIZE="1MiB", APP_AZURE_MAX_SINGLE_PUT_SIZE="1MiB"
    )
    assert not any(key in env for key in FALLBACK_KEYS)
    service = services(env)
    startup_calls = token_server.tokens_issued
    assert service.status()["auth_method"] == "DefaultAzureCredential"
    upload_one(service, layout, azurite_https, azurite_container)
    log = service.log_text()
    assert "Azure auth: using DefaultAzureCredential" in log
    # One token for the startup check (parent), at least one more for the upload (child).
    assert startup_calls >= 1 and token_server.tokens_issued > startup_calls
    assert token_server.bad_header_calls == 0
    assert {r.resource for r in token_server.requests} == {tokens().STORAGE_RESOURCE}
    print(
        f"[figures] identity upload: {startup_calls} token call(s) at startup, "
        f"{token_server.tokens_issued - startup_calls} during the upload"
    )
    secrets.assert_absent(log)


# ------------------------------------------------------------- fallbacks
@pytest.mark.timeout(90)
def test_identity_refused_falls_back_to_the_connection_string(
    services: Callable[[dict[str, str]], Service],
    service_env: EnvFactory,
    layout: Layout,
    azurite_https: Azurite,
    azurite_container: str,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "refuse"
    env = service_env(
        token_server.env(), APP_AZURE_CONNECTION_STRING=azurite_https.connection_string
    )
    service = services(env)
    assert token_server.calls >= 1  # the identity really was tried first
    assert service.status()["auth_method"] == "connection string"
    upload_one(service, layout, azurite_https, azurite_container)
    log = service.log_text()
    chosen = next(line for line in log.splitlines() if "Azure auth: using" in line)
    assert "using connection string after DefaultAzureCredential" in chosen
    assert "could not get a token" in chosen and "token endpoint refused" in chosen
    secrets.assert_absent(log)


@pytest.mark.timeout(90)
def test_identity_endpoint_closed_falls_back_to_account_name_and_key(
    services: Callable[[dict[str, str]], Service],
    service_env: EnvFactory,
    layout: Layout,
    azurite_https: Azurite,
    azurite_container: str,
    secrets: Secrets,
) -> None:
    env = service_env(
        closed_port_identity(),
        APP_AZURE_ACCOUNT_NAME=azurite_https.account_name,
        APP_AZURE_ACCOUNT_KEY=azurite_https.account_key,
    )
    service = services(env)
    assert service.status()["auth_method"] == "account key"
    upload_one(service, layout, azurite_https, azurite_container)
    log = service.log_text()
    chosen = next(line for line in log.splitlines() if "Azure auth: using" in line)
    assert "using account key after DefaultAzureCredential: could not get a token" in chosen
    assert "Connection refused" in chosen
    assert "connection string: not configured" in chosen
    secrets.assert_absent(log)


# ------------------------------------------- token rejected by storage
@pytest.mark.timeout(90)
def test_token_with_wrong_audience_falls_back_when_it_can(
    services: Callable[[dict[str, str]], Service],
    service_env: EnvFactory,
    layout: Layout,
    azurite_https: Azurite,
    azurite_container: str,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "wrong_audience"
    env = service_env(
        token_server.env(),
        APP_AZURE_ACCOUNT_NAME=azurite_https.account_name,
        APP_AZURE_ACCOUNT_KEY=azurite_https.account_key,
    )
    service = services(env)
    assert token_server.tokens_issued >= 1  # a token was issued, and storage refused it
    assert service.status()["auth_method"] == "account key"
    upload_one(service, layout, azurite_https, azurite_container, size=512 * 1024)
    log = service.log_text()
    chosen = next(line for line in log.splitlines() if "Azure auth: using" in line)
    assert (
        "storage rejected the DefaultAzureCredential (403 AuthenticationFailed): "
        "check the identity's token"
    ) in chosen
    secrets.assert_absent(log)


@pytest.mark.timeout(60)
def test_token_with_wrong_audience_and_no_fallback_exits(
    service_env: EnvFactory,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "wrong_audience"
    output, _ = run_failing(service_env(token_server.env()), "wrong audience, no fallback")
    line = final_line(output)
    assert "storage rejected the DefaultAzureCredential (403 AuthenticationFailed)" in line
    assert "audience https://storage.azure.com" in line
    for key in FALLBACK_KEYS:
        assert key in line
    secrets.assert_absent(output)


# ---------------------------------------------------- nothing usable
@pytest.mark.timeout(60)
def test_nothing_usable_names_the_fallback_keys_and_why_the_identity_failed(
    service_env: EnvFactory,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "refuse"
    output, _ = run_failing(service_env(token_server.env()), "identity refused, no fallback")
    line = final_line(output)
    assert "no usable Azure credentials" in line
    for key in FALLBACK_KEYS:
        assert key in line
    assert "DefaultAzureCredential: could not get a token" in line
    assert "token endpoint refused (test mode, 400)" in line  # the endpoint's own reason
    assert token_server.calls >= 1
    secrets.assert_absent(output)


@pytest.mark.timeout(60)
def test_hung_token_endpoint_and_no_fallback_exits_within_the_bound(
    service_env: EnvFactory,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "hang"
    output, elapsed = run_failing(service_env(token_server.env()), "token endpoint hangs")
    assert elapsed > BOUND_S - 1  # it did wait for the identity, not give up early
    line = final_line(output)
    assert "no answer within 10 s from the token endpoint" in line
    for key in FALLBACK_KEYS:
        assert key in line
    assert token_server.calls == 1  # the startup check asks once, then gives up
    secrets.assert_absent(output)


@pytest.mark.timeout(90)
def test_hung_token_endpoint_with_a_fallback_starts_within_the_bound(
    services: Callable[[dict[str, str]], Service],
    service_env: EnvFactory,
    azurite_https: Azurite,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "hang"
    env = service_env(
        token_server.env(), APP_AZURE_CONNECTION_STRING=azurite_https.connection_string
    )
    started = time.monotonic()
    service = services(env)
    elapsed = time.monotonic() - started
    print(f"[figures] token endpoint hangs, connection string: ready after {elapsed:.2f} s")
    assert elapsed < BOUND_S + MARGIN_S
    assert service.status()["auth_method"] == "connection string"
    log = service.log_text()
    assert "DefaultAzureCredential failed: no answer within 5 s from the token endpoint" in log
    assert token_server.calls == 1

    # The abandoned check must not keep its request open for long: the
    # credential's own read timeout (10 s at startup, not 4 x 300 s) ends it.
    assert service.proc is not None
    parent = psutil.Process(service.proc.pid)

    def to_token_server() -> list[Any]:
        return [
            c
            for c in parent.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == token_server.port
        ]

    assert to_token_server(), "the abandoned token request should still be open right after start"
    wait_until(
        lambda: not to_token_server(),
        timeout=15,
        what="the abandoned token request to be closed by its read timeout",
    )
    print(
        f"[figures] abandoned token request closed {time.monotonic() - started:.2f} s "
        "after the service was launched"
    )
    secrets.assert_absent(log)


# ------------------------------------------ what an operator must fix
@pytest.mark.timeout(60)
def test_wrong_account_key_exits_saying_which_keys_to_check(
    service_env: EnvFactory,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    token_server.mode = "refuse"
    env = service_env(
        token_server.env(),
        APP_AZURE_ACCOUNT_NAME="devstoreaccount1",
        APP_AZURE_ACCOUNT_KEY=WRONG_KEY,
    )
    output, _ = run_failing(env, "wrong account key")
    line = final_line(output)
    # Azurite with OAuth on answers a bad shared key with 400 InvalidAuthenticationInfo
    # (403 AuthorizationFailure without OAuth, 403 AuthenticationFailed on Azure).
    assert re.search(
        r"account key: storage rejected the account key \(4\d\d \w+\): "
        r"check APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY",
        line,
    ), line
    secrets.assert_absent(output)


@pytest.mark.timeout(60)
def test_missing_container_exits_even_with_a_working_identity_and_fallback(
    service_env: EnvFactory,
    azurite_https: Azurite,
    token_server: TokenServer,
    secrets: Secrets,
) -> None:
    env = service_env(
        token_server.env(),
        APP_AZURE_CONTAINER="no-such-container",
        APP_AZURE_CONNECTION_STRING=azurite_https.connection_string,
    )
    output, _ = run_failing(env, "missing container")
    line = final_line(output)
    assert (
        "DefaultAzureCredential: container 'no-such-container' does not exist "
        "(404 ContainerNotFound); create it or fix APP_AZURE_CONTAINER"
    ) in line
    assert (
        "connection string" not in line.split("Tried:")[1].split(". Fix")[0]
    )  # fatal: not retried
    assert token_server.tokens_issued >= 1
    secrets.assert_absent(output)


class HangingServer:
    """A loopback TCP server that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    server = HangingServer()
    yield server
    server.close()


@pytest.mark.timeout(60)
def test_hung_blob_endpoint_exits_within_the_bound_naming_the_url(
    service_env: EnvFactory,
    azurite_https: Azurite,
    token_server: TokenServer,
    hanging_server: HangingServer,
    secrets: Secrets,
) -> None:
    """Both fallbacks point at an endpoint that accepts and never answers (plain HTTP)."""
    token_server.mode = "refuse"
    url = f"http://127.0.0.1:{hanging_server.port}/devstoreaccount1"
    hung_string = azurite_https.connection_string.replace(azurite_https.account_url, url)
    env = service_env(
        token_server.env(),
        APP_AZURE_ACCOUNT_URL=url,
        APP_AZURE_CONNECTION_STRING=hung_string,
        APP_AZURE_ACCOUNT_NAME=azurite_https.account_name,
        APP_AZURE_ACCOUNT_KEY=azurite_https.account_key,
    )
    output, elapsed = run_failing(env, "blob endpoint hangs")
    assert elapsed > BOUND_S - 1
    assert len(hanging_server.accepted) >= 2  # both fallbacks really connected
    line = final_line(output)
    assert (
        "DefaultAzureCredential: token credentials need an https:// APP_AZURE_ACCOUNT_URL" in line
    )
    assert (
        "connection string: no answer within 5 s from the blob endpoint in "
        "APP_AZURE_CONNECTION_STRING"
    ) in line
    assert (
        f"account key: no answer within 5 s from {url} (it accepted the connection but "
        "did not answer): check APP_AZURE_ACCOUNT_URL"
    ) in line
    secrets.values.append(hung_string)
    secrets.assert_absent(output)


# ------------------------------------------------- tokens expire mid-upload
class StaticToken:
    """A credential that always hands out the same token (for the control below)."""

    def __init__(self, token: str, exp: int) -> None:
        from azure.core.credentials import AccessToken

        self.token = AccessToken(token, exp)

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self.token


@pytest.mark.timeout(120)
def test_long_upload_outlives_its_short_lived_tokens(
    services: Callable[[dict[str, str]], Service],
    service_env: EnvFactory,
    layout: Layout,
    azurite_https: Azurite,
    azurite_container: str,
    token_server: TokenServer,
    secrets: Secrets,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tokens live 3 s; one upload takes several times that and still commits the right bytes.

    The SDK asks for a new token whenever the one it holds has < 300 s left
    (so here before every request), and the uploader's own credential goes
    back to the endpoint as the upload proceeds. The endpoint answers in
    0.12 s, like a real one, which also makes the upload last long enough on
    any machine. Control first: Azurite really refuses an expired token, so
    the upload can only succeed on fresh ones.
    """
    from azure.core.exceptions import HttpResponseError

    lifetime, latency = 3, 0.12
    make_token = tokens().make_token
    with azurite_https.container_client(
        azurite_container, credential=StaticToken(*make_token())
    ) as fresh:
        fresh.get_container_properties()
    with (
        azurite_https.container_client(
            azurite_container, credential=StaticToken(*make_token(lifetime_s=-5))
        ) as old,
        pytest.raises(HttpResponseError) as refused,
    ):
        old.get_container_properties()
    assert refused.value.status_code in (401, 403)

    token_server.lifetime_s = lifetime
    answer = token_server._answer

    def slow_answer(*args: Any) -> Any:
        time.sleep(latency)
        return answer(*args)

    monkeypatch.setattr(token_server, "_answer", slow_answer)
    size, block = 48 * MiB, 1 * MiB
    env = service_env(
        token_server.env(),
        APP_AZURE_MAX_CONCURRENCY="1",
        APP_AZURE_MAX_BLOCK_SIZE=str(block),
        APP_AZURE_MAX_SINGLE_PUT_SIZE=str(block),
    )
    service = services(env)
    session = service.start_session("expiring-tokens")
    token_server.reset()  # from here on, every token is for this one upload
    md5 = write_random(layout.incoming / "long.bin", size)
    done = service.wait_processed(1, timeout=90)
    requests = token_server.requests
    blob = f"{session['date_prefix']}/{session['encoded_session']}/long.bin"
    assert azurite_https.blob_md5(azurite_container, blob) == md5
    assert done["processed_ok"] == 1 and done["processed_err"] == 0

    assert all(r.status == 200 for r in requests), requests
    first, last = requests[0], requests[-1]
    assert first.token_exp is not None
    span = last.at - first.at
    outlived = last.at - first.token_exp  # how long after the first token expired it went on
    expired_before_last = sum(1 for r in requests if r.token_exp and r.token_exp < last.at)
    print(
        f"[figures] token expiry: {size // MiB} MiB in {block // MiB} MiB blocks, 1 at a "
        f"time; {len(requests)} token calls over {span:.1f} s of upload with {lifetime} s "
        f"tokens; {expired_before_last} of them had expired before the last request, which "
        f"came {outlived:.1f} s after the first token had expired"
    )
    assert len(requests) >= 2
    assert outlived >= 1.0, "the upload finished before its first token expired: not a test"
    secrets.assert_absent(service.log_text())
