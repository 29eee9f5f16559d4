"""Unit tests of the pure parts: names, sizes, stability, the queue, the redactor.

These complement the end-to-end tests; they never replace them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from ingestd import filesteps
from ingestd.config import parse_size
from ingestd.logs import SecretRedactor
from ingestd.messages import Job
from ingestd.scanner import stable_files
from ingestd.sessions import SessionNameError, encode_session, new_session
from ingestd.workqueue import WorkQueue

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("my session", "my%20session"),
        ("a/b", "a%2Fb"),
        ("../x", "..%2Fx"),
        ("über", "%C3%BCber"),
        ("100%", "100%25"),
        ("nul\x00byte", "nul%00byte"),
        ("...", "..."),
    ],
)
def test_session_encoding_is_one_safe_path_component(name: str, encoded: str) -> None:
    assert encode_session(name) == encoded
    assert "/" not in encode_session(name)


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_are_refused(name: str) -> None:
    with pytest.raises(SessionNameError, match="not allowed"):
        encode_session(name)


def test_names_longer_than_255_bytes_once_encoded_are_refused() -> None:
    assert encode_session("x" * 255) == "x" * 255
    with pytest.raises(SessionNameError, match="too long"):
        encode_session("x" * 256)
    with pytest.raises(SessionNameError, match="too long"):
        encode_session("ü" * 50)  # 300 bytes once encoded


def test_blank_names_are_generated_and_the_date_is_utc() -> None:
    late_evening_in_new_york = dt.datetime(
        2026, 1, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))
    )
    session = new_session("  ", now=late_evening_in_new_york)
    assert session.name.startswith("00-session-")
    assert session.date == "20260201"
    assert session.blob_prefix == f"20260201/{session.encoded}/"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (8388608, 8388608),
        ("8MiB", 8 * 1024**2),
        ("4 MB", 4_000_000),
        ("1gib", 1024**3),
        ("512", 512),
    ],
)
def test_sizes_accept_bytes_and_units(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["eight", "8XB", "-1MiB", ""])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_file_is_stable_only_when_unchanged_and_old_enough() -> None:
    now = 1_000 * 10**9
    old, young = now - 10 * 10**9, now - 1 * 10**9
    previous = {"a": (10, old, 1), "b": (10, old, 2), "c": (10, young, 3), "d": (5, old, 4)}
    current = {
        "a": (10, old, 1),
        "b": (11, old, 2),
        "c": (10, young, 3),
        "d": (5, old, 9),
        "e": (1, old, 5),
    }
    stable = stable_files(previous, current, now, min_age_s=5)
    # b grew, c is too young, d was replaced (new inode), e is new this poll
    assert stable == [("a", 10, old)]


def test_queue_is_bounded_dedups_names_and_orders_work() -> None:
    queue = WorkQueue(max_size=2)
    assert queue.add_new(Job("n1", "20260101", "s"))
    assert not queue.add_new(Job("n1", "20260101", "s")), "same name twice"
    assert queue.add_new(Job("n2", "20260101", "s"))
    assert not queue.add_new(Job("n3", "20260101", "s")), "over the bound"
    assert queue.dropped == 1
    assert queue.add_recovered(Job("r1", "20251231", "old"))  # recovered ignore the bound
    queue.retry(Job("x", "20260101", "s"), not_before=100.0)
    assert queue.take(now=50.0).name == "r1"
    assert queue.take(now=50.0).name == "n1"
    assert queue.take(now=100.0).name == "x"
    job = queue.take(now=100.0)
    assert job.name == "n2" and queue.take(now=100.0) is None
    assert queue.holds(job.key)
    queue.finish(job)
    assert not queue.holds(job.key)


def test_queue_knows_a_job_by_date_session_and_name() -> None:
    """Two files of one name under two sessions (or dates) are two jobs, both kept."""
    queue = WorkQueue(max_size=10)
    assert queue.add_recovered(Job("same.bin", "20260101", "a"))
    assert queue.add_recovered(Job("same.bin", "20260101", "b"))
    assert queue.add_recovered(Job("same.bin", "20260102", "a"))
    assert not queue.add_recovered(Job("same.bin", "20260101", "a")), "the same key twice"
    assert not queue.add_new(Job("same.bin", "20260101", "b")), "already queued"
    assert queue.add_new(Job("same.bin", "20260103", "a"))
    taken = [queue.take(now=0.0) for _ in range(4)]
    assert {job.key for job in taken} == {
        ("20260101", "a", "same.bin"),
        ("20260101", "b", "same.bin"),
        ("20260102", "a", "same.bin"),
        ("20260103", "a", "same.bin"),
    }


def test_redactor_scrubs_secrets_from_messages_args_and_tracebacks() -> None:
    secret = "AccountKey=c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    redactor = SecretRedactor([secret])
    try:
        raise RuntimeError(f"bad connection string {secret}")
    except RuntimeError:
        import sys

        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "using %s", (secret,), sys.exc_info()
        )
    redactor.filter(record)
    assert secret not in record.getMessage()
    assert secret not in (record.exc_text or "")
    assert "***" in record.getMessage()


@pytest.mark.timeout(10)
def test_free_name_never_picks_a_taken_name_and_stays_within_name_max(tmp_path: Path) -> None:
    from ingestd.filesteps import free_name

    assert free_name(tmp_path / "a.bin") == tmp_path / "a.bin"
    (tmp_path / "a.bin").write_bytes(b"1")
    (tmp_path / "a.bin.1").write_bytes(b"2")
    assert free_name(tmp_path / "a.bin") == tmp_path / "a.bin.2"
    longest = "ü" * 127 + "x"  # 255 bytes
    (tmp_path / longest).write_bytes(b"3")
    chosen = free_name(tmp_path / longest)
    assert chosen.name == "ü" * 126 + ".1"  # whole characters dropped: 254 bytes
    chosen.write_bytes(b"4")  # the filesystem takes it
    assert (tmp_path / longest).read_bytes() == b"3"


@pytest.mark.timeout(10)
def test_outage_backoff_rises_once_per_round_not_once_per_failed_file() -> None:
    from ingestd.workqueue import OutageBackoff

    backoff = OutageBackoff(cap_s=60.0)
    # Round 1: four uploaders fail within a second: all retry together, at 2 s.
    assert [backoff.retry_at(t) for t in (0.0, 0.3, 0.6, 0.9)] == [2.0] * 4
    # Round 2: the retries fail: 4 s from the first of them.
    assert [backoff.retry_at(t) for t in (2.1, 2.2)] == [6.1, 6.1]
    # Rounds 3 to 7: 8, 16, 32, then the cap.
    now, delays = 6.2, []
    for _ in range(5):
        retry = backoff.retry_at(now)
        delays.append(round(retry - now, 6))
        now = retry + 0.1
    assert delays == [8.0, 16.0, 32.0, 60.0, 60.0]
    backoff.reset()  # an upload went through
    assert backoff.retry_at(500.0) == 502.0


# Storage outages (issue 13): the timeout arithmetic, the classification, the state


@pytest.mark.parametrize("stall", [4.0, 10.0, 15.0, 60.0, 300.0])
def test_every_network_wait_is_shorter_than_the_stall_timeout(stall: float) -> None:
    from ingestd.config import Settings
    from ingestd.storageclient import NetworkBudget

    budget = NetworkBudget.of(
        Settings(
            azure_account_url="http://127.0.0.1:1/x",
            azure_container="c",
            child_stall_timeout_s=stall,
        )
    )
    backoffs = [
        budget.backoff_s + (2**n if n else 0) + budget.backoff_s / 2 for n in range(budget.retries)
    ]
    assert max(budget.connect_s, budget.read_s, *backoffs) < stall, budget
    if stall == 60.0:  # the defaults: a whole unanswered request within the stall timeout
        assert (budget.connect_s, budget.read_s, budget.backoff_s) == (10.0, 15.0, 4.0)
        assert budget.worst_case_s() <= stall


_ENVIRONMENT_NAMES = (
    *(f"{scheme}_PROXY" for scheme in ("HTTP", "HTTPS", "ALL", "NO")),
    *(f"{scheme}_proxy" for scheme in ("http", "https", "all", "no")),
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _ENVIRONMENT_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _per_request(url: str) -> tuple[dict[str, str], object]:
    """What requests itself resolves from the environment for one request (trust_env on)."""
    import requests

    merged = requests.Session().merge_environment_settings(url, {}, None, None, None)
    return merged["proxies"], merged["verify"]


def test_the_proxy_and_ca_bundle_are_read_once_and_as_requests_would(
    no_proxy_environment: pytest.MonkeyPatch,
) -> None:
    """The storage client does not read the environment per request; what it
    read once must be what requests would have read on each request."""
    from ingestd.storageclient import environment_once

    env = no_proxy_environment
    url = "https://acct.blob.core.windows.net"
    assert environment_once(url) == {"use_env_settings": False}
    env.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    env.setenv("CURL_CA_BUNDLE", "/etc/ssl/curl.pem")
    once = environment_once(url)
    proxies, verify = _per_request(url)
    assert once["proxies"]["https"] == proxies["https"] == "http://127.0.0.1:3128"
    assert once["connection_verify"] == verify == "/etc/ssl/curl.pem"
    env.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")  # wins over CURL_CA_BUNDLE
    assert environment_once(url)["connection_verify"] == _per_request(url)[1] == "/etc/ssl/corp.pem"
    env.setenv("NO_PROXY", "localhost,.blob.core.windows.net")  # the host is exempt
    assert "proxies" not in environment_once(url)
    assert _per_request(url)[0] == {}


def test_a_connection_strings_own_endpoint_decides_the_proxy(
    no_proxy_environment: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY is matched against the host the client really sends to."""
    from pydantic import SecretStr

    from ingestd.config import Settings
    from ingestd.storageclient import container_client
    from ingestd.storageerrors import CONNECTION_STRING

    no_proxy_environment.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    no_proxy_environment.setenv("NO_PROXY", "localhost")
    connection_string = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        "BlobEndpoint=http://127.0.0.1:2/devstoreaccount1;"
    )
    settings = Settings(
        azure_account_url="http://localhost:1/devstoreaccount1",  # exempt, but not used
        azure_container="c",
        azure_connection_string=SecretStr(connection_string),
    )
    client = container_client(settings, CONNECTION_STRING)
    assert client.url.startswith("http://127.0.0.1:2/")
    assert client._config.proxy_policy.proxies["http"] == "http://127.0.0.1:3128"


def test_storage_failures_are_classified_for_operators() -> None:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    from ingestd.storageerrors import outage_kind

    def status(code: int, error_code: str = "") -> HttpResponseError:
        exc = HttpResponseError(message="x")
        exc.status_code, exc.error_code = code, error_code
        return exc

    refused = ServiceRequestError(
        "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    assert outage_kind(refused) == "refused"
    assert outage_kind(ServiceResponseError("Read timed out. (read timeout=3)")) == "timeout"
    assert outage_kind(ServiceRequestError("Connection aborted: reset by peer")) == "unreachable"
    assert outage_kind(status(503, "ServerBusy")) == "throttled"
    assert outage_kind(status(429)) == "throttled"
    assert outage_kind(status(500, "InternalError")) == "5xx"
    assert outage_kind(status(403, "AuthorizationFailure")) == "auth"
    assert outage_kind(status(403, "AuthorizationPermissionMismatch")) == "auth"
    assert outage_kind(ClientAuthenticationError("no token")) == "auth"
    assert outage_kind(status(400, "Md5Mismatch")) == ""  # the file's problem, counted
    assert outage_kind(ValueError("bug")) == ""


def test_storage_health_tells_outage_from_auth_and_times_the_auth_exit() -> None:
    from ingestd.storagehealth import StorageHealth

    health = StorageHealth()
    health.failed("timeout", "read timed out", mono=10.0, wall=1000.0)
    view = health.view(12.0, auth_exit_s=300)
    assert (view["state"], view["reachable"], view["reason"], view["for_s"]) == (
        "unreachable",
        False,
        "timeout",
        2.0,
    )
    assert health.auth_failing_for(12.0) == 0.0 and view["auth_exit_in_s"] is None
    health.failed("auth", "403", mono=20.0, wall=1010.0)
    health.failed("refused", "refused", mono=25.0, wall=1015.0)  # a blip does not restart it
    health.failed("auth", "403", mono=30.0, wall=1020.0)
    assert health.view(40.0, 300)["state"] == "auth_failing"
    assert health.view(40.0, 300)["reachable"] is True
    assert health.auth_failing_for(40.0) == 20.0
    assert health.view(40.0, 300)["auth_exit_in_s"] == 280.0
    health.ok(mono=41.0, wall=1031.0)
    assert health.view(42.0, 300)["state"] == "ok" and health.auth_failing_for(42.0) == 0.0


def test_make_folder_survives_a_pruner_removing_the_folders_at_the_same_time(
    tmp_path: Path,
) -> None:
    """Another uploader's prune_folders can remove a session or date folder while
    we make it. Path.mkdir(exist_ok=True) then fails (ENOENT or EEXIST); make_folder
    does not. Both run against the same pruner, so the test shows the race is real."""
    folder = tmp_path / "20261130" / "session"
    stop = threading.Event()

    def prune() -> None:
        while not stop.is_set():
            for emptied in (folder, folder.parent):
                with contextlib.suppress(OSError):
                    os.rmdir(emptied)
            time.sleep(0.0002)  # a prune now and then, not a wall of them

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the race shows in a short run
    pruner = threading.Thread(target=prune, daemon=True)
    pruner.start()
    plain_failures = made = 0
    try:
        for _ in range(3000):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, FileNotFoundError):
                plain_failures += 1
        for _ in range(3000):
            filesteps.make_folder(folder)
            made += 1
    finally:
        stop.set()
        pruner.join(timeout=5)
        sys.setswitchinterval(previous)
    assert plain_failures > 0, "the pruner never raced the plain mkdir: the test shows nothing"
    assert made == 3000
