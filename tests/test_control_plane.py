"""The control plane: who may drive the API, what it keeps, what it logs, how it stops.

Issue 15. Each point is shown on the real service, started as a process and
driven over HTTP on 127.0.0.1 against Azurite:

* ``APP_API_TOKEN``: the 401/200 matrix on every endpoint, with the token
  unset, missing, wrong and right; the token in no log line, response or metric;
* bounded per-session state: ``/v1/status`` after 10,000 starts without a name;
* text logs: a file name carrying a newline and a fake log prefix forges no line;
* SIGHUP: drain, exit 0, the file in flight delivered intact.

A few pure checks (the route guard, the escaper, the folding) run in-process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import statistics
import time
from collections import Counter

import httpx
import pytest

from tests.support.azurite import Azurite
from tests.support.service import Layout, Service, base_env, run_once, wait_until, write_random

MiB = 1024 * 1024
TOKEN = "ct-" + secrets.token_hex(24)  # one per run: found in no fixture or earlier log
WRONG = "ct-" + secrets.token_hex(24)

PROBES = [("GET", "/healthz"), ("GET", "/readyz")]
CONTROL = [("POST", "/v1/watch/start"), ("POST", "/v1/watch/stop")]
READS = [("GET", "/v1/status"), ("GET", "/metrics")]
DOCS = [("GET", "/openapi.json"), ("GET", "/docs")]
EVERY_ENDPOINT = PROBES + CONTROL + READS + DOCS

CREDENTIALS = {
    "missing": {},
    "wrong": {"Authorization": f"Bearer {WRONG}"},
    "right": {"Authorization": f"Bearer {TOKEN}"},
    # Near misses: each must be refused like a wrong token.
    "right token, Basic scheme": {"Authorization": f"Basic {TOKEN}"},
    "right token with a suffix": {"Authorization": f"Bearer {TOKEN}x"},
    "prefix of the token": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "scheme without a token": {"Authorization": "Bearer"},
}


def call(service: Service, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    """One request with exactly ``headers`` (``service.http`` would add the token)."""
    body = {"json": {"session_name": "matrix"}} if path == "/v1/watch/start" else {}
    with httpx.Client(base_url=service.url, timeout=5.0) as bare:
        return bare.request(method, path, headers=headers, **body)


def assert_refused(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, (what, response.status_code, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer"), what
    assert response.headers["content-type"].startswith("application/json"), what
    assert "bearer token" in response.json()["detail"], what


def authorized_status(service: Service) -> dict:
    return call(service, "GET", "/v1/status", CREDENTIALS["right"]).raise_for_status().json()


# ---------------------------------------------------------------------------
# The token
# ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_without_a_token_every_endpoint_is_open_and_the_start_says_so(make_service) -> None:
    service = make_service()
    for method, path in EVERY_ENDPOINT:
        for name, headers in CREDENTIALS.items():
            response = call(service, method, path, headers)
            assert response.status_code == 200, (method, path, name, response.text)
    logs = service.log_text()
    assert "control API not protected (APP_API_TOKEN unset); it listens on 127.0.0.1:" in logs
    assert "control API NOT protected" not in logs, "loopback only: no warning"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reads_protected", [False, True], ids=["reads-open", "reads-protected"])
def test_token_matrix_on_every_endpoint(make_service, reads_protected: bool) -> None:
    service = make_service(
        APP_API_TOKEN=TOKEN, APP_API_TOKEN_FOR_READS=str(reads_protected).lower()
    )
    protected = CONTROL + (READS if reads_protected else [])
    for method, path in EVERY_ENDPOINT:
        for name, headers in CREDENTIALS.items():
            what = f"{method} {path} with {name} token"
            before = authorized_status(service)
            response = call(service, method, path, headers)
            if (method, path) in protected and name != "right":
                assert_refused(response, what)
                after = authorized_status(service)
                # A refused call changed nothing.
                assert (after["enabled"], after["active_session"]) == (
                    before["enabled"],
                    before["active_session"],
                ), what
                assert len(after["sessions"]) == len(before["sessions"]), what
            else:
                assert response.status_code == 200, (what, response.text)
    # The right token really did drive the service.
    assert call(service, "POST", "/v1/watch/stop", CREDENTIALS["right"]).status_code == 200
    assert authorized_status(service)["enabled"] is False
    assert call(service, "POST", "/v1/watch/start", CREDENTIALS["right"]).status_code == 200
    assert authorized_status(service)["active_session"] == "matrix"
    reads = "too" if reads_protected else "not (APP_API_TOKEN_FOR_READS=false)"
    assert f"/v1/status and /metrics {reads}" in service.log_text()


@pytest.mark.timeout(90)
def test_a_bad_body_without_the_token_is_refused_before_it_is_read(make_service) -> None:
    """401 comes before the body: a caller without the token learns nothing of its shape."""
    service = make_service(APP_API_TOKEN=TOKEN)
    bodies = {
        "malformed JSON": {
            "content": b"{not json",
            "headers": {"Content-Type": "application/json"},
        },
        "a wrong field": {"json": {"session_name": 5, "unknown": 1}},
        "over the size limit": {"content": b"x" * (64 * 1024)},
    }
    with httpx.Client(base_url=service.url, timeout=5.0) as bare:
        for what, body in bodies.items():
            for name in ("missing", "wrong", "scheme without a token"):
                headers = {**body.get("headers", {}), **CREDENTIALS[name]}
                request = {k: v for k, v in body.items() if k != "headers"}
                response = bare.post("/v1/watch/start", headers=headers, **request)
                assert_refused(response, f"{what} with the {name} token")
            right = {**body.get("headers", {}), **CREDENTIALS["right"]}
            request = {k: v for k, v in body.items() if k != "headers"}
            answered = bare.post("/v1/watch/start", headers=right, **request)
            assert answered.status_code in (413, 422), (what, answered.status_code)
        # An unknown route with a state-changing method is refused the same way.
        assert_refused(bare.post("/v1/nowhere", content=b"{"), "an unknown route")
    assert authorized_status(service)["sessions"] == []


@pytest.mark.timeout(90)
def test_no_child_holds_the_token(make_service) -> None:
    """Only the parent checks the token: no child gets it in its environment or settings."""
    service = make_service(APP_API_TOKEN=TOKEN, APP_LOG_LEVEL="DEBUG")
    children = [c["pid"] for c in service.children() if c["pid"]]
    assert len(children) >= 2, children
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            assert TOKEN.encode() not in environ.read(), pid
    assert TOKEN not in service.log_text()


@pytest.mark.timeout(90)
def test_openapi_declares_the_bearer_scheme_where_it_applies(make_service) -> None:
    service = make_service(APP_API_TOKEN=TOKEN, APP_API_TOKEN_FOR_READS="true")
    spec = service.http.get("/openapi.json").json()
    ((name, scheme),) = spec["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for method, path in CONTROL + READS:
        assert spec["paths"][path][method.lower()]["security"] == [{name: []}], path
    for method, path in PROBES:
        assert "security" not in spec["paths"][path][method.lower()], path
    assert TOKEN not in json.dumps(spec)


@pytest.mark.timeout(120)
def test_the_token_is_in_no_log_line_response_or_metric(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """A whole run with the token: control calls, refusals, an upload, errors, DEBUG logs.

    One session name carries the token on purpose (a client's mistake), so a
    log line would hold it if the redactor missed it.
    """
    service = make_service(
        APP_API_TOKEN=TOKEN, APP_API_TOKEN_FOR_READS="true", APP_LOG_LEVEL="DEBUG"
    )
    right = CREDENTIALS["right"]
    responses: list[httpx.Response] = []
    for _, headers in CREDENTIALS.items():
        for method, path in EVERY_ENDPOINT:
            responses.append(call(service, method, path, headers))
    responses.append(
        service.http.post("/v1/watch/start", headers=right, json={"session_name": "secret run"})
    )
    md5 = write_random(layout.incoming / "t.bin", 3 * MiB)
    wait_until(
        lambda: authorized_status(service)["processed_ok"] == 1, 60, interval=0.2, what="the upload"
    )
    date = responses[-1].json()["date_prefix"]
    assert azurite.blob_md5(azurite_container, f"{date}/secret%20run/t.bin") == md5
    # Validation errors, an unknown route, a refused read: none may echo the token.
    responses.append(
        service.http.post("/v1/watch/start", headers=right, json={"session_name": 5, "x": 1})
    )
    responses.append(service.http.get(f"/v1/{TOKEN}", headers=right))
    responses.append(call(service, "GET", "/v1/status", {"Authorization": TOKEN}))
    responses.append(service.http.get("/metrics", headers=right))
    responses.append(service.http.get("/v1/status", headers=right))
    # The mistake: a session named after the token. Its own response echoes the
    # name the client sent (not checked); the logs must not.
    leaky = service.http.post(
        "/v1/watch/start", headers=right, json={"session_name": f"oops-{TOKEN}"}
    )
    assert leaky.status_code == 200
    responses.append(service.http.get("/metrics", headers=right))
    service.stop()

    assert all(r.status_code in (200, 401, 404, 422) for r in responses)
    assert {r.status_code for r in responses} >= {200, 401, 404, 422}
    for response in responses:
        text = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
        assert TOKEN not in text, (response.request.url, response.status_code)
    logs = service.log_text()
    assert "refused GET /v1/status" in logs and "wrong bearer token" in logs
    assert "session started" in logs and "uploaded " in logs
    assert "oops-***" in logs, "the redactor scrubbed the token out of the session name"
    assert TOKEN not in logs


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"APP_API_TOKEN": "short"}, "APP_API_TOKEN: Value error, must be at least 16 characters"),
        ({"APP_API_TOKEN": ""}, "APP_API_TOKEN: Value error, must be at least 16 characters"),
        ({"APP_API_TOKEN": "sixteen or more but with spaces"}, "printable ASCII without spaces"),
        ({"APP_API_TOKEN_FOR_READS": "true"}, "APP_API_TOKEN_FOR_READS=true needs APP_API_TOKEN"),
    ],
)
def test_an_unusable_token_setting_stops_the_start(layout: Layout, env: dict, says: str) -> None:
    result = run_once(
        base_env(
            {
                **layout.env(),
                "APP_AZURE_ACCOUNT_URL": "https://127.0.0.1:9/x",
                "APP_AZURE_CONTAINER": "c",
                **env,
            }
        )
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert says in output
    if env.get("APP_API_TOKEN"):
        assert env["APP_API_TOKEN"] not in output


def test_open_api_beyond_loopback_warns(caplog: pytest.LogCaptureFixture) -> None:
    """The WARN path in-process: the tests never bind anything but 127.0.0.1."""
    from ingestd.apiauth import is_loopback, log_protection
    from ingestd.config import Settings

    def settings(**kw: object) -> Settings:
        return Settings(azure_account_url="https://127.0.0.1:9/x", azure_container="c", **kw)

    for host in ("0.0.0.0", "::", "10.1.2.3", "ingestd.example"):
        assert not is_loopback(host), host
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    with caplog.at_level(logging.INFO, logger="ingestd.api"):
        log_protection(settings(http_host="0.0.0.0"))
        log_protection(settings(http_host="127.0.0.1"))
        log_protection(settings(http_host="0.0.0.0", api_token=TOKEN))
    levels = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert levels == [
        ("WARNING", "control API NOT protected"),
        ("INFO", "control API not protected (APP_API_TOKEN unset); it listens on 127.0.0.1"),
        ("INFO", "control API protected"),
    ]


def test_every_state_changing_route_requires_the_token() -> None:
    """The guard for endpoints added later: a POST/PUT/PATCH/DELETE without the token fails here.

    Read from the app's OpenAPI, which FastAPI builds from each route's
    dependencies: the bearer scheme is there only through ``require_token``.
    """
    from ingestd import api
    from ingestd.apiauth import bearer
    from ingestd.config import Settings
    from ingestd.metrics import Metrics
    from ingestd.supervisor import Supervisor

    settings = Settings(
        azure_account_url="https://127.0.0.1:9/x", azure_container="c", http_host="127.0.0.1"
    )
    spec = api.create_app(Supervisor(settings, "test"), Metrics()).openapi()
    operations = [
        (method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items()
    ]
    changing = [(m, p, op) for m, p, op in operations if m in ("post", "put", "patch", "delete")]
    assert {p for _, p, _ in changing} >= {"/v1/watch/start", "/v1/watch/stop"}
    for method, path, op in changing:
        assert op.get("security") == [{bearer.scheme_name: []}], f"{method} {path} is open"
    for path in ("/healthz", "/readyz", "/v1/status", "/metrics"):
        assert "security" not in spec["paths"][path]["get"], path


# ---------------------------------------------------------------------------
# Bounded per-session state
# ---------------------------------------------------------------------------
def status_figures(service: Service, samples: int = 200) -> tuple[int, float, float]:
    """Size of /v1/status in bytes, and p50/p99 latency in ms over ``samples`` calls."""
    size, took = 0, []
    for _ in range(samples):
        started = time.perf_counter()
        response = service.http.get("/v1/status")
        took.append(1000 * (time.perf_counter() - started))
        assert response.status_code == 200
        size = len(response.content)
    took.sort()
    return size, statistics.median(took), took[int(0.99 * (len(took) - 1))]


@pytest.mark.timeout(600)
def test_status_stays_small_after_10000_starts_without_a_name(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    history = 100  # the default, not set here
    service = make_service()
    first = service.start_session("first")
    md5 = write_random(layout.incoming / "early.bin", 2 * MiB)
    service.wait_processed(1, timeout=60)
    assert azurite.blob_md5(azurite_container, f"{first['date_prefix']}/first/early.bin") == md5
    fresh = status_figures(service)

    figures = {}
    started = time.monotonic()
    for n in range(1, 10_001):
        response = service.http.post("/v1/watch/start")
        assert response.status_code == 200, response.text
        if n in (1_000, 10_000):
            figures[n] = status_figures(service)
    seconds = time.monotonic() - started
    status = service.status()
    print(f"\n10,000 starts in {seconds:.1f} s; /v1/status size and latency (p50/p99):")
    for label, (size, p50, p99) in [
        ("fresh", fresh),
        ("after 1,000", figures[1_000]),
        ("after 10,000", figures[10_000]),
    ]:
        print(f"  {label:>13}: {size:6d} bytes, {p50:6.2f} / {p99:6.2f} ms")

    assert status["active_session"] == response.json()["session_name"]
    sessions = status["sessions"]
    assert len(sessions) == history + 1, "the active session and the last 100"
    assert sessions[-1]["session"] == response.json()["encoded_session"]
    older = status["older_sessions"]
    assert older["count"] == 1 + 10_000 - len(sessions)
    assert older["files_done"] == 1 and older["bytes_done"] == 2 * MiB, (
        "the folded first session's upload is kept in the totals"
    )
    assert sum(s["files_done"] for s in sessions) + older["files_done"] == status["processed_ok"]
    size_1k, size_10k = figures[1_000][0], figures[10_000][0]
    assert size_10k < 64 * 1024, size_10k
    assert size_10k - size_1k < 256, "no growth past the bound, digits aside"


def test_folding_keeps_the_active_session_and_every_count() -> None:
    from ingestd.stats import Stats
    from ingestd.status import session_rows

    stats = Stats(history=2)
    stats.start("d", "active")
    for name in ("a", "b", "c", "d"):
        stats.on_done(stats.session("d", name), 10)
    assert set(stats.sessions) == {("d", "active"), ("d", "c"), ("d", "d")}
    stats.on_failed(stats.session("d", "a"), "late result for a folded session")
    assert set(stats.sessions) == {("d", "active"), ("d", "d"), ("d", "a")}
    kept, older = session_rows(stats, Counter({("d", "b"): 3}), Counter({("d", "b"): 1}))
    assert {s.session for s in kept} == {"active", "d", "a", "b"}, "in flight: listed"
    assert kept[-1].session == "b"
    assert older.files_done + sum(s.files_done for s in kept) == stats.processed_ok == 4
    assert older.failed + sum(s.failed for s in kept) == stats.processed_err == 1
    assert older.queued == 0 and kept[-1].queued == 3
    none = Stats(history=0)
    none.start("d", "x")
    none.on_done(none.session("d", "y"), 1)
    assert list(none.sessions) == [("d", "x")] and none.older.files_done == 1


# ---------------------------------------------------------------------------
# Log lines cannot be forged
# ---------------------------------------------------------------------------
FAKE_PREFIX = "2020-01-01 00:00:00,000 INFO api[1]"


@pytest.mark.timeout(90)
def test_a_newline_in_a_file_name_forges_no_log_line(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    service = make_service(APP_LOG_FORMAT="text")
    session = service.start_session(f"forged\n{FAKE_PREFIX} session")
    name = f"evil\n{FAKE_PREFIX} all files uploaded\r\x1b[2Kok.bin"
    md5 = write_random(layout.incoming / name, MiB)
    service.wait_processed(1, timeout=60)
    blob = f"{session['date_prefix']}/{session['encoded_session']}/{name}"
    assert azurite.blob_md5(azurite_container, blob) == md5
    service.stop()

    lines = service.log_text().splitlines()
    forged = [line for line in lines if line.startswith(FAKE_PREFIX)]
    assert forged == [], forged
    # Not vacuous: the name was logged, escaped, in the message and in file=.
    uploaded = [line for line in lines if " uploaded " in line and "evil" in line]
    assert uploaded, "the upload was not logged"
    assert f"evil\\n{FAKE_PREFIX} all files uploaded\\r\\x1b[2Kok.bin" in uploaded[0]
    assert "file='evil\\n" in uploaded[0]
    record = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w-]+\[\d+\] ")
    strays = [line for line in lines if not record.match(line) and not line.startswith("    ")]
    assert strays == [], "every line is a record, or an indented traceback line"


def test_text_format_escapes_messages_and_indents_tracebacks() -> None:
    from ingestd.logs import TextFormatter, escape

    assert (
        escape("a\nb\rc\td\x00e\x1bf\x85g\u2028h\\i")
        == "a\\nb\\rc\\td\\x00e\\x1bf\\x85g\\u2028h\\\\i"
    )
    formatter = TextFormatter()
    record = logging.LogRecord(
        "x",
        logging.ERROR,
        __file__,
        1,
        "copy of %s failed: %s",
        (f"n\n{FAKE_PREFIX} a", f"e\r\n{FAKE_PREFIX} b"),
        None,
    )
    record.role = "uploader-1"
    try:
        raise OSError(f"bad\n{FAKE_PREFIX} c")
    except OSError:
        import sys

        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    lines = text.split("\n")
    assert not any(line.startswith(FAKE_PREFIX) for line in lines), text
    assert all(line.startswith("    ") for line in lines[1:]), text
    assert f"copy of n\\n{FAKE_PREFIX} a failed: e\\r\\n{FAKE_PREFIX} b" in lines[0]


# ---------------------------------------------------------------------------
# SIGHUP
# ---------------------------------------------------------------------------
def uploading(service: Service) -> bool:
    return any(
        f["stage"] == "uploading" and f["bytes_done"] > 0 for f in service.status()["in_flight"]
    )


@pytest.mark.timeout(240)
def test_sighup_drains_exits_0_and_the_file_in_flight_arrives_intact(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    """SIGHUP to the whole process group, as a closed terminal sends it."""
    service = make_service(APP_SHUTDOWN_GRACE_S="90", APP_AZURE_MAX_CONCURRENCY="1")
    session = service.start_session("hangup")
    md5 = write_random(layout.incoming / "inflight.bin", 256 * MiB)
    wait_until(lambda: uploading(service), 60, interval=0.05, what="the upload to start")
    uploaders = {c["pid"] for c in service.children() if c["role"].startswith("uploader")}

    assert service.proc is not None
    service.track_pids()
    os.killpg(service.proc.pid, signal.SIGHUP)
    wait_until(
        lambda: service.http.get("/readyz").status_code == 503,
        5,
        interval=0.02,
        what="/readyz to turn 503 (draining)",
    )
    assert service.http.get("/healthz").status_code == 200
    during = service.status()
    assert during["draining"] and during["in_flight"], "still uploading while draining"
    assert {
        c["pid"] for c in during["children"] if c["role"].startswith("uploader")
    } == uploaders, "the uploaders ignored SIGHUP"
    assert service.wait_exit(timeout=120) == 0
    wait_until(lambda: not service.survivors(), 10, what="no process left")
    logs = service.log_text()
    assert "drained: no upload in flight" in logs
    # The uploader outlived the hang-up (children ignore it) and finished during
    # the drain: had it died, the file would have waited for the restart.
    assert not re.search(r"uploader-\d+ \(pid \d+\) exited", logs), logs[-3000:]
    blob = f"{session['date_prefix']}/hangup/inflight.bin"
    assert azurite.blob_md5(azurite_container, blob) == md5

    restarted = make_service()
    wait_until(
        lambda: not restarted.status()["in_flight"] and not restarted.status()["queue"]["depth"],
        60,
        what="an idle restart",
    )
    assert azurite.blob_md5(azurite_container, blob) == md5
    assert layout.files_under(layout.processing) == []
    assert layout.files_under(layout.staging) == []
