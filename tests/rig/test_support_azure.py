"""Self-tests of the Azure test infrastructure (tests/support: azurite, tokens, netguard).

Why: every end-to-end test of ingestd trusts these helpers. Each test here
checks a behaviour that would break if the helper were wrong (wrong bytes,
lost data on restart, a token Azurite refuses, a child escaping loopback),
not merely that the helper returns something.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContentSettings

from tests.support import netguard as ng

if TYPE_CHECKING:
    from tests.support.azurite import Azurite, AzuriteFactory
    from tests.support.tokens import TokenServer

# The lead's conftest may list it too; registering twice is harmless.
pytest_plugins = ["tests.support.tokens"]

STORAGE_RESOURCE = "https://storage.azure.com"

SCOPE = "https://storage.azure.com/.default"
REPO = Path(__file__).resolve().parents[2]

# A stand-in for the real service: a separate process that only has the
# environment the test gives it, and uses DefaultAzureCredential.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    args = json.loads(sys.argv[1])
    out = {"ok": False}
    t = time.monotonic()
    try:
        from azure.identity import DefaultAzureCredential
        cred = DefaultAzureCredential(**args.get("cred_kwargs", {}))
        if args["action"] == "get_token":
            cred.get_token("https://storage.azure.com/.default")
        else:
            from azure.storage.blob import ContainerClient
            client = ContainerClient(args["url"], args["container"], credential=cred,
                                     **args.get("client_kwargs", {}))
            out["container"] = client.get_container_properties().name
            client.upload_blob(args["blob"], args["data"].encode(), overwrite=True)
        out["ok"] = True
    except Exception as exc:
        out.update(exc_type=type(exc).__module__ + "." + type(exc).__name__,
                   message=str(exc), error_code=getattr(exc, "error_code", None),
                   status=getattr(getattr(exc, "response", None), "status_code", None))
    out["elapsed"] = time.monotonic() - t
    print(json.dumps(out))
    """
)
FAST = {"retry_total": 0, "connection_timeout": 5, "read_timeout": 5}


def child_cmd(args: dict[str, Any]) -> list[str]:
    return [sys.executable, "-c", CHILD, json.dumps(args)]


def run_child(args: dict[str, Any], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Run the child to completion and return its JSON result."""
    proc = subprocess.run(
        child_cmd(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def storage_args(az: Azurite, container: str, blob: str, data: str, **kw: Any) -> dict[str, Any]:
    return {
        "action": "storage",
        "url": az.account_url,
        "container": container,
        "blob": blob,
        "data": data,
        **kw,
    }


# ----------------------------------------------------------------- Azurite
@pytest.mark.timeout(60)
def test_azurite_http_up_with_container(azurite: Azurite, azurite_container: str) -> None:
    assert azurite.running
    assert azurite.account_url == f"http://127.0.0.1:{azurite.port}/devstoreaccount1"
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    names = [c.name for c in client.list_containers()]
    assert azurite_container in names
    assert azurite.ca_bundle_path is None


@pytest.mark.timeout(60)
def test_upload_then_blob_md5_hashes_real_bytes(azurite: Azurite, azurite_container: str) -> None:
    """blob_md5 must hash what landed, not the Content-MD5 property the uploader claimed."""
    data = os.urandom(5 * 1024 * 1024 + 123)  # more than one 4 MiB download chunk
    other = os.urandom(1000)
    name = f"selftest/{uuid.uuid4().hex}.bin"
    lie = hashlib.md5(other).digest()  # a wrong whole-file MD5, stored as a property
    client = azurite.container_client(azurite_container)
    client.upload_blob(name, data)
    client.get_blob_client(name).set_http_headers(ContentSettings(content_md5=lie))
    client.upload_blob(name + ".other", other)

    assert azurite.blob_md5(azurite_container, name) == hashlib.md5(data).hexdigest()
    assert azurite.blob_md5(azurite_container, name + ".other") == hashlib.md5(other).hexdigest()
    stored = client.get_blob_client(name).get_blob_properties().content_settings.content_md5
    assert bytes(stored) == lie  # the property was a lie; blob_md5 ignored it
    assert name in azurite.blob_names(azurite_container, prefix="selftest/")
    with pytest.raises(ResourceNotFoundError):
        azurite.blob_md5(azurite_container, name + ".missing")


@pytest.mark.timeout(120)
def test_persistent_azurite_keeps_blobs_across_stop_start(azurite_factory: AzuriteFactory) -> None:
    az = azurite_factory(persistent=True)
    port, pid = az.port, az.pid
    az.create_container("persist")
    data = os.urandom(300_000)
    az.container_client("persist").upload_blob("kept.bin", data)

    az.stop()
    assert not az.running and az.pid == pid
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    az.start()
    assert az.port == port and az.pid != pid
    assert az.blob_md5("persist", "kept.bin") == hashlib.md5(data).hexdigest()


@pytest.mark.timeout(120)
def test_in_memory_azurite_loses_blobs_on_restart(azurite_factory: AzuriteFactory) -> None:
    """Control for the test above: without --location, a restart empties the store."""
    az = azurite_factory()
    az.create_container("volatile")
    az.stop()
    az.start()
    assert not az.container_client("volatile").exists()


# ----------------------------------------------- HTTPS + managed identity
@pytest.mark.timeout(120)
def test_https_subprocess_default_credential_uses_token_server(
    azurite_https: Azurite,
    azurite_container: str,
    token_server: TokenServer,
    netguard_child_env: Any,
) -> None:
    env = netguard_child_env(token_server.env(ca_bundle=azurite_https.ca_bundle_path))
    blob = f"selftest/mi-{uuid.uuid4().hex}.txt"
    result = run_child(
        storage_args(azurite_https, azurite_container, blob, "via managed identity"), env
    )

    assert result["ok"], result
    assert result["container"] == azurite_container
    assert token_server.calls >= 1 and token_server.tokens_issued >= 1
    assert token_server.bad_header_calls == 0
    assert {r.resource for r in token_server.requests} == {STORAGE_RESOURCE}
    expected = hashlib.md5(b"via managed identity").hexdigest()
    assert azurite_https.blob_md5(azurite_container, blob) == expected


@pytest.mark.timeout(120)
def test_subprocess_needs_the_ca_bundle_env(
    azurite_https: Azurite, azurite_container: str, token_server: TokenServer
) -> None:
    """Control: without REQUESTS_CA_BUNDLE the child cannot trust Azurite's cert."""
    env = ng.child_env(token_server.env())  # no ca_bundle
    args = storage_args(azurite_https, azurite_container, "never.txt", "x", client_kwargs=FAST)
    result = run_child(args, env)
    assert not result["ok"]
    assert result["exc_type"] == "azure.core.exceptions.ServiceRequestError"
    assert "CERTIFICATE_VERIFY_FAILED" in result["message"]


@pytest.mark.timeout(120)
def test_wrong_audience_token_is_rejected_by_azurite(
    azurite_https: Azurite, azurite_container: str, token_server: TokenServer
) -> None:
    token_server.mode = "wrong_audience"
    env = ng.child_env(token_server.env(ca_bundle=azurite_https.ca_bundle_path))
    args = storage_args(azurite_https, azurite_container, "never.txt", "x", client_kwargs=FAST)
    result = run_child(args, env)

    assert not result["ok"]
    assert result["exc_type"] == "azure.core.exceptions.ClientAuthenticationError"
    assert result["status"] == 403
    assert result["error_code"] == "AuthenticationFailed"
    assert "Invalid token audience" in result["message"]
    assert token_server.tokens_issued >= 1


@pytest.mark.timeout(60)
def test_refused_token_request_fails_fast(
    token_server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP 400 from the endpoint: not retried, ClientAuthenticationError at once."""
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    token_server.set_mode("refuse", refuse_status=400)
    token_server.install_env(monkeypatch)
    started = time.monotonic()
    with pytest.raises(ClientAuthenticationError, match=r"invalid_scope.*400"):
        DefaultAzureCredential().get_token(SCOPE)
    assert time.monotonic() - started < 5
    assert token_server.calls == 1


@pytest.mark.timeout(90)
def test_hung_token_endpoint_blocks_get_token_until_read_timeout(
    token_server: TokenServer, tmp_path: Path
) -> None:
    token_server.mode = "hang"
    env = ng.child_env(token_server.env())

    # Defaults: still blocked well after the request reached the endpoint.
    log = tmp_path / "blocked.out"
    with open(log, "w") as out:
        blocked = subprocess.Popen(
            child_cmd({"action": "get_token"}),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        assert token_server.wait_for_calls(1, timeout=30), log.read_text()
        time.sleep(3)
        assert blocked.poll() is None, (
            f"get_token returned while the endpoint hangs: {log.read_text()}"
        )
    finally:
        blocked.kill()
        blocked.wait(timeout=10)

    # Bounded by the credential's own transport knobs.
    before = token_server.calls
    result = run_child(
        {"action": "get_token", "cred_kwargs": {"read_timeout": 2, "retry_total": 0}},
        env,
        timeout=60,
    )
    assert not result["ok"]
    assert result["exc_type"] == "azure.core.exceptions.ClientAuthenticationError"
    assert "Read timed out" in result["message"]
    assert 1.8 <= result["elapsed"] < 15, result
    assert token_server.calls == before + 1


@pytest.mark.timeout(60)
def test_short_lived_tokens_are_fetched_again(
    azurite_https: Azurite,
    azurite_container: str,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """azure-core renews a token with < 300 s (minus 0-60 s jitter) left; msal won't cache it.

    So a 90 s token is fetched for every request, a 1 h token once.
    """
    from azure.identity import DefaultAzureCredential

    token_server.install_env(monkeypatch, ca_bundle=azurite_https.ca_bundle_path)
    for lifetime, expected_calls in ((90, 3), (3600, 1)):
        token_server.lifetime_s = lifetime
        token_server.reset()
        client = azurite_https.service_client(credential=DefaultAzureCredential())
        container = client.get_container_client(azurite_container)
        for _ in range(3):
            container.get_container_properties()
        assert token_server.tokens_issued == expected_calls, lifetime
        assert all(
            r.token_exp and r.token_exp - r.at <= lifetime + 1 for r in token_server.requests
        )


# ----------------------------------------------------------------- netguard
OFF_BOX = [("169.254.169.254", 80), ("10.255.255.1", 80)]


@pytest.mark.timeout(30)
def test_guard_refuses_off_box_connects_before_sending(netguard: ng.NetGuard) -> None:
    # tripwire: should the guard let a call through, the real socket refuses it too.
    with netguard.tripwire(), netguard.expect_violations() as caught:
        for address in OFF_BOX:
            started = time.monotonic()
            with pytest.raises(ng.NetworkGuardViolation):
                socket.create_connection(address, timeout=0.5)
            assert time.monotonic() - started < 0.2  # refused, not timed out

            sock = socket.socket()
            with pytest.raises(ng.NetworkGuardViolation):
                sock.connect_ex(address)
            assert sock.fileno() == -1  # closed by the guard, never connected

        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(ng.NetworkGuardViolation):
            udp.sendto(b"x", ("10.255.255.1", 53))
        started = time.monotonic()
        with pytest.raises(ng.NetworkGuardViolation):
            socket.socket().connect(("metadata.invalid", 80))  # no DNS lookup either
        assert time.monotonic() - started < 0.2

    operations = [(v.operation, v.address) for v in caught]
    assert ("connect", "('169.254.169.254', 80)") in operations
    assert ("connect_ex", "('10.255.255.1', 80)") in operations
    assert ("sendto", "('10.255.255.1', 53)") in operations
    assert len(caught) == 6
    assert netguard.violations == []  # all expected: this test must not fail


@pytest.mark.timeout(30)
def test_guard_allows_loopback_and_unix_sockets(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        socket.create_connection(("localhost", port), timeout=2).close()
        sock = socket.socket()
        assert sock.connect_ex(("127.0.0.1", port)) == 0
        sock.close()
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as unix_server:
        unix_server.bind(path)
        unix_server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    assert ng.GUARD.installed


@pytest.mark.timeout(10)
def test_guard_comes_back_when_something_restores_the_socket_methods() -> None:
    """A plugin or monkeypatch that puts the real methods back is undone by the next phase."""
    real = ng.GUARD._originals["connect"]
    socket.socket.connect = real  # what such a plugin would do
    try:
        assert not ng.GUARD.installed
    finally:
        ng.install()  # what the plugin does at the start of every test phase
    assert ng.GUARD.installed
    assert socket.socket.connect.__doc__ and "netguard" in socket.socket.connect.__doc__


@pytest.mark.timeout(60)
def test_guard_fails_a_test_that_swallows_the_violation(tmp_path: Path) -> None:
    """The plugin must turn a caught NetworkGuardViolation into a failed test."""
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import socket
            from tests.support.netguard import GUARD
            def test_swallows():
                with GUARD.tripwire():  # nothing leaves even if the plugin is broken
                    try:
                        socket.create_connection(("169.254.169.254", 80), timeout=0.2)
                    except Exception:
                        pass
            def test_loopback_ok():
                with socket.create_server(("127.0.0.1", 0)) as s:
                    socket.create_connection(s.getsockname(), timeout=1).close()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.support.netguard",
            "-p",
            "no:cacheprovider",
            "-q",
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
    assert "NetworkGuardViolation" in proc.stdout and "169.254.169.254" in proc.stdout


@pytest.mark.timeout(60)
def test_child_guard_refuses_and_logs(tmp_path: Path, token_server: TokenServer) -> None:
    guard_dir = tmp_path / "guard"
    env = ng.child_env(token_server.env(), guard_dir=guard_dir)
    code = textwrap.dedent(
        """
        import socket, sys
        guard = sys.modules.get("_ingestd_netguard")  # loaded by the sitecustomize
        if guard is None or not guard.GUARD.installed:
            sys.exit("guard not installed in the child")  # never try the connect unguarded
        with guard.GUARD.tripwire():
            try:
                socket.create_connection(("169.254.169.254", 80), timeout=0.5)
            except Exception as e:
                print(type(e).__name__)
        print("pytest" in sys.modules)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.stdout.split() == ["NetworkGuardViolation", "False"], proc.stderr
    found = ng.child_violations(guard_dir)
    assert [v["address"] for v in found] == ["('169.254.169.254', 80)"]


def _risks(env: dict[str, str]) -> list[str]:
    return ng.imds_risks(env)


@pytest.mark.timeout(10)
def test_assert_no_imds_rules(token_server: TokenServer) -> None:
    good = token_server.env()
    ng.assert_no_imds(good)
    assert any(
        "IMDS" in r for r in _risks({"AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential"})
    )
    no_header = {k: v for k, v in good.items() if k != "IDENTITY_HEADER"}
    assert any("169.254.169.254" in r for r in _risks(no_header))
    assert any(
        "unset" in r
        for r in _risks({k: v for k, v in good.items() if k != "AZURE_TOKEN_CREDENTIALS"})
    )
    assert _risks({**good, "IDENTITY_ENDPOINT": "http://10.1.2.3/msi/token"})
    assert _risks({**good, "HTTPS_PROXY": "http://proxy.example:3128"})
    # Workload identity is excluded when only ManagedIdentityCredential is selected.
    wi = {
        "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        "AZURE_CLIENT_ID": "c",
        "AZURE_TENANT_ID": "t",
        "AZURE_FEDERATED_TOKEN_FILE": "/f",
    }
    assert any("IMDS" in r for r in _risks(wi))
    with pytest.raises(AssertionError, match="not offline-safe"):
        ng.child_env({}, base={"PATH": "/usr/bin", "IDENTITY_ENDPOINT": "http://127.0.0.1:1/x"})
