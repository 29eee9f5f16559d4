"""The blob endpoint proxy (tests/support/proxy.py), each mode shown against a real Azurite.

The campaign trusts these modes to be what they claim: if ``refuse`` left the
port open or ``blackhole`` answered, an "outage" would test nothing.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.storage.blob import ContainerClient

from tests.support.azurite import Azurite
from tests.support.proxy import AUTH_PREFIX, BlobProxy, corrupt_signature

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[BlobProxy]:
    with BlobProxy(azurite.port) as running:
        yield running


def client(proxy: BlobProxy, azurite: Azurite, container: str) -> ContainerClient:
    """A client through the proxy that fails fast: no retries, short timeouts."""
    return ContainerClient(
        proxy.account_url(azurite.account_name),
        container,
        credential=azurite.shared_key,
        retry_total=0,
        connection_timeout=2,
        read_timeout=2,
    )


def http_get(port: int) -> bytes:
    return (
        f"GET /devstoreaccount1?comp=list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()


def test_pass_forwards_and_counts(
    proxy: BlobProxy, azurite: Azurite, azurite_container: str
) -> None:
    data = os.urandom(300_000)
    with client(proxy, azurite, azurite_container) as blobs:
        blobs.upload_blob("proxy/pass.bin", data, overwrite=True)
        back = blobs.download_blob("proxy/pass.bin").readall()
    assert hashlib.md5(back).digest() == hashlib.md5(data).digest()
    counts = proxy.counts()
    assert counts.up >= len(data) and counts.down >= len(data), counts
    assert counts.requests >= 2 and counts.connections >= 1, counts
    before = proxy.reset_counts()
    assert before == counts
    after = proxy.counts()
    assert (after.up, after.down, after.requests, after.connections) == (0, 0, 0, 0)
    assert after.up_total == counts.up_total and after.requests_total == counts.requests_total


def test_refuse_closes_the_port_resets_live_connections_and_reopens(
    proxy: BlobProxy, azurite: Azurite, azurite_container: str
) -> None:
    live = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    live.sendall(http_get(proxy.port))
    assert live.recv(1024).startswith(b"HTTP/1.1"), "the keep-alive connection works first"
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        live.sendall(http_get(proxy.port))
        live.recv(1024)
    live.close()
    with client(proxy, azurite, azurite_container) as blobs, pytest.raises(ServiceRequestError):
        blobs.get_container_properties()
    port = proxy.port
    proxy.pass_through()
    assert proxy.port == port, "re-listens on the same port"
    with client(proxy, azurite, azurite_container) as blobs:
        assert blobs.get_container_properties().name == azurite_container


def test_blackhole_accepts_and_never_answers(
    proxy: BlobProxy, azurite: Azurite, azurite_container: str
) -> None:
    proxy.blackhole()
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    raw.sendall(http_get(proxy.port))
    raw.settimeout(1.5)
    with pytest.raises(socket.timeout):
        raw.recv(1024)
    with (
        client(proxy, azurite, azurite_container) as blobs,
        pytest.raises((ServiceResponseError, ServiceRequestError)),
    ):
        blobs.get_container_properties()
    assert proxy.counts().up > 0 and proxy.counts().down == 0
    proxy.pass_through()
    with pytest.raises(ConnectionResetError):
        raw.recv(1024)
    raw.close()
    with client(proxy, azurite, azurite_container) as blobs:
        assert blobs.get_container_properties().name == azurite_container


def test_corrupt_auth_makes_storage_answer_403(
    proxy: BlobProxy, azurite: Azurite, azurite_container: str
) -> None:
    proxy.corrupt_auth()
    with (
        client(proxy, azurite, azurite_container) as blobs,
        pytest.raises(HttpResponseError) as caught,
    ):
        blobs.upload_blob("proxy/denied.bin", b"x" * 1000, overwrite=True)
    assert caught.value.status_code == 403, caught.value
    proxy.pass_through()
    with client(proxy, azurite, azurite_container) as blobs:
        blobs.upload_blob("proxy/allowed.bin", b"y" * 1000, overwrite=True)
    assert "proxy/denied.bin" not in azurite.blob_names(azurite_container, prefix="proxy/")


def test_corrupt_signature_keeps_the_length_and_changes_one_character() -> None:
    line = AUTH_PREFIX + b"devstoreaccount1:AbCd+/Ef=="
    changed = corrupt_signature(line)
    assert len(changed) == len(line)
    assert sum(a != b for a, b in zip(line, changed, strict=True)) == 1
    assert changed.startswith(AUTH_PREFIX + b"devstoreaccount1:")


def test_corrupt_auth_header_split_across_reads(azurite: Azurite, azurite_container: str) -> None:
    """A header that arrives in pieces is still altered (and nothing else is held back)."""
    with BlobProxy(azurite.port) as proxy:
        proxy.corrupt_auth()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        request = (
            f"GET /devstoreaccount1/{azurite_container}?restype=container HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nx-ms-version: 2021-08-06\r\n"
            "x-ms-date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        ).encode()
        raw.sendall(request + AUTH_PREFIX[:10])
        raw.sendall(AUTH_PREFIX[10:] + b"devstoreaccount1:QUJD\r\n\r\n")
        raw.settimeout(5)
        answer = raw.recv(4096)
        raw.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
