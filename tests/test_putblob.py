"""``PutBlob``, the one request of a small file sent without the SDK's pipeline.

Against a real Azurite (and, for the answers Azurite cannot be made to give,
a loopback server that answers 503 and then passes the request on): the
request must do what the SDK's ``upload_blob`` did, and fail the way the
SDK fails, so that what the uploader and the outage handling make of a
failure stays the same.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import ContainerClient

from ingestd.blobupload import condition_failed
from ingestd.putblob import PutBlob
from ingestd.storageclient import NetworkBudget
from ingestd.storageerrors import outage_kind
from tests.support import devstore
from tests.support.azurite import Azurite
from tests.support.proxy import BlobProxy

BUDGET = NetworkBudget(connect_s=2.0, read_s=2.0, backoff_s=0.1, retries=2)


def _client(account_url: str, container: str, key: str = devstore.ACCOUNT_KEY) -> ContainerClient:
    connection_string = devstore.connection_string(account_url).replace(devstore.ACCOUNT_KEY, key)
    return ContainerClient.from_connection_string(connection_string, container)


@pytest.fixture
def put_blob(azurite: Azurite, azurite_container: str) -> Iterator[PutBlob]:
    sender = PutBlob(_client(azurite.account_url, azurite_container), BUDGET)
    yield sender
    sender.close()


def _data(size: int = 300_000) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    return data, hashlib.md5(data).digest()


@pytest.mark.timeout(60)
def test_a_put_stores_the_bytes_their_md5_the_tier_and_the_metadata(
    put_blob: PutBlob, azurite: Azurite, azurite_container: str
) -> None:
    data, md5 = _data()
    name = "putblob/odd name %41 ~ süß.bin"
    headers = {"x-ms-meta-ingestd_name": "odd%20name", "x-ms-access-tier": "Cool"}
    put_blob.put(name, data, md5, {**headers, "If-None-Match": "*"})
    assert azurite.blob_md5(azurite_container, name) == md5.hex()
    with azurite.container_client(azurite_container) as client:
        properties = client.get_blob_client(name).get_blob_properties()
    assert bytes(properties.content_settings.content_md5) == md5
    assert properties.metadata == {"ingestd_name": "odd%20name"}
    assert properties.blob_tier == "Cool"
    assert properties.size == len(data)


@pytest.mark.timeout(60)
def test_conditions_fail_as_the_sdks_do(
    put_blob: PutBlob, azurite: Azurite, azurite_container: str
) -> None:
    """A taken name under If-None-Match, a changed blob under If-Match: refused, and
    recognised as a failed condition; the blob keeps its bytes."""
    data, md5 = _data()
    name = "putblob/conditions.bin"
    put_blob.put(name, data, md5, {"If-None-Match": "*"})
    other, other_md5 = _data()
    with pytest.raises(ResourceExistsError) as taken:
        put_blob.put(name, other, other_md5, {"If-None-Match": "*"})
    assert taken.value.status_code == 409 and condition_failed(taken.value)
    with pytest.raises(ResourceModifiedError) as changed:
        put_blob.put(name, other, other_md5, {"If-Match": '"0x8D000000000000"'})
    assert changed.value.status_code == 412 and condition_failed(changed.value)
    assert azurite.blob_md5(azurite_container, name) == md5.hex()
    with azurite.container_client(azurite_container) as client:
        etag = client.get_blob_client(name).get_blob_properties().etag
    put_blob.put(name, other, other_md5, {"If-Match": etag})  # unchanged since seen: replaced
    assert azurite.blob_md5(azurite_container, name) == other_md5.hex()


@pytest.mark.timeout(60)
def test_bytes_that_do_not_match_their_md5_are_refused(
    put_blob: PutBlob, azurite: Azurite, azurite_container: str
) -> None:
    data, _ = _data()
    with pytest.raises(HttpResponseError) as refused:
        put_blob.put("putblob/corrupt.bin", data, hashlib.md5(b"other").digest(), {})
    assert refused.value.status_code == 400
    assert refused.value.error_code == "Md5Mismatch"  # type: ignore[attr-defined]
    assert outage_kind(refused.value) == ""  # about the file, not an outage
    with azurite.container_client(azurite_container) as client:
        assert not client.get_blob_client("putblob/corrupt.bin").exists()


@pytest.mark.timeout(60)
def test_a_wrong_key_is_an_auth_outage(azurite: Azurite, azurite_container: str) -> None:
    wrong = base64.b64encode(b"not the account key").decode()
    sender = PutBlob(_client(azurite.account_url, azurite_container, key=wrong), BUDGET)
    data, md5 = _data()
    with pytest.raises(HttpResponseError) as refused:
        sender.put("putblob/wrong-key.bin", data, md5, {})
    assert refused.value.status_code == 403
    assert outage_kind(refused.value) == "auth"


@pytest.mark.timeout(60)
def test_a_closed_port_is_refused_after_the_budgets_retries(azurite_container: str) -> None:
    port = devstore.free_port()
    sender = PutBlob(_client(devstore.account_url(port), azurite_container), BUDGET)
    data, md5 = _data()
    with pytest.raises(ServiceRequestError) as refused:
        sender.put("putblob/refused.bin", data, md5, {})
    assert outage_kind(refused.value) == "refused"


@pytest.mark.timeout(60)
def test_no_answer_is_a_timeout_within_the_budget(azurite: Azurite, azurite_container: str) -> None:
    with BlobProxy(azurite.port) as proxy:
        proxy.blackhole()
        sender = PutBlob(
            _client(proxy.account_url(azurite.account_name), azurite_container), BUDGET
        )
        data, md5 = _data()
        with pytest.raises(ServiceResponseError) as silent:
            sender.put("putblob/blackholed.bin", data, md5, {})
    assert outage_kind(silent.value) == "timeout"


class _BusyThenPass(http.server.BaseHTTPRequestHandler):
    """Answers 503 ServerBusy to the first ``busy`` requests, then relays to Azurite."""

    server: Any

    def do_PUT(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(self.headers.get("x-ms-client-request-id"))
        if len(self.server.seen) <= self.server.busy:
            self.send_response(503)
            self.send_header("x-ms-error-code", "ServerBusy")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = socket.create_connection(("127.0.0.1", self.server.upstream_port))
        head = f"PUT {self.path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in self.headers.items() if k.lower() != "connection"
        )
        upstream.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
        answer = b""
        while chunk := upstream.recv(65536):
            answer += chunk
        upstream.close()
        self.wfile.write(answer)
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def busy_server(azurite: Azurite) -> Iterator[Any]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BusyThenPass)
    server.seen, server.busy, server.upstream_port = [], 0, azurite.port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_a_busy_answer_is_sent_again_and_the_last_one_is_raised(
    busy_server: Any, azurite: Azurite, azurite_container: str
) -> None:
    """Two 503s, then storage: the third request lands (the budget allows 2 retries),
    each a new request; three 503s: the third is raised, as a throttled outage."""
    url = f"http://127.0.0.1:{busy_server.server_address[1]}/{azurite.account_name}"
    sender = PutBlob(_client(url, azurite_container), BUDGET)
    data, md5 = _data()
    busy_server.busy = 2
    sender.put("putblob/busy.bin", data, md5, {})
    assert len(busy_server.seen) == 3 and len(set(busy_server.seen)) == 3
    assert azurite.blob_md5(azurite_container, "putblob/busy.bin") == md5.hex()

    busy_server.seen.clear()
    busy_server.busy = 3
    with pytest.raises(HttpResponseError) as busy:
        sender.put("putblob/busy-again.bin", data, md5, {})
    assert busy.value.status_code == 503 and outage_kind(busy.value) == "throttled"
    assert len(busy_server.seen) == 3
