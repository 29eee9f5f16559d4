"""Put Blob, the one request of a small file, sent without the SDK's request pipeline.

Most files of a busy share are small, and each costs one Put Blob. Sent
through azure-storage-blob, that request spends 1.3 ms of CPU in the
client (its policies, ``requests``, ``urllib3``), as much as hashing the
MiB itself; sent here it spends 0.6 ms (measured against Azurite, 300 puts
of 1 MiB, bench/RESULTS.md). What is kept from the SDK, so that nothing
about the request differs: the client's own credential policy signs it
(Shared Key, or the bearer token the client's policy holds and renews),
its API version, its blob URL quoting. What is done here instead: the
retries and their waits, as :class:`NetworkBudget` documents them (the
SDK's own policy counts its first retry as the second, so its waits on the
block path are 2 s longer each), the
proxy and CA bundle the environment names
(:func:`~ingestd.storageclient.environment_once`), and errors raised as the
SDK raises them (``HttpResponseError`` with ``status_code`` and
``error_code``; ``ServiceRequestError`` when no request went out,
``ServiceResponseError`` when no answer came), so that their
classification (:mod:`ingestd.storageerrors`) is the same.

Everything else (blocks, the commit of a block list, looking at a blob)
still goes through the SDK.
"""

from __future__ import annotations

import base64
import random
import time
import uuid
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

import certifi
import urllib3
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.rest import HttpRequest
from azure.storage.blob import ContainerClient

import ingestd
from ingestd.storageclient import NetworkBudget, environment_once

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Answers worth the same request again (the SDK's: 408 and 5xx but 501 and 505; and 429)."""

_NOT_SENT = (  # as the SDK's requests transport maps them: ServiceRequestError
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ProxyError,
)

_EXCEPTION_FOR_STATUS: dict[int, type[HttpResponseError]] = {
    401: ClientAuthenticationError,
    404: ResourceNotFoundError,
    409: ResourceExistsError,
    412: ResourceModifiedError,
}


class PutBlob:
    """Put Blob requests for the blobs of one container, on a kept-alive connection pool."""

    def __init__(self, client: ContainerClient, budget: NetworkBudget) -> None:
        self._container_url = client.url.rstrip("/")
        self._api_version = client.api_version
        # The client's own policy: the same signature, the same token cache.
        policy = client._credential_policy  # noqa: SLF001
        if policy is None:
            raise ValueError("a client without a credential cannot sign a Put Blob")
        self._sign = policy.on_request
        self._budget = budget
        self._timeout = urllib3.Timeout(connect=budget.connect_s, read=budget.read_s)
        self._pool = _pool(self._container_url)
        self._user_agent = f"ingestd/{ingestd.__version__}"

    def put(
        self,
        blob_name: str,
        data: bytes,
        md5: bytes,
        headers: dict[str, str],
    ) -> None:
        """Send ``data`` as the whole blob; ``headers`` add the tier, metadata and condition.

        ``md5`` is both the request's Content-MD5 (storage refuses bytes
        that differ) and the MD5 stored on the blob. Retries as the SDK
        would, within the budget; raises the SDK's exceptions.
        """
        url = f"{self._container_url}/{quote(blob_name, safe='~/')}"
        encoded_md5 = base64.b64encode(md5).decode()
        fixed = {
            "x-ms-version": self._api_version,
            "x-ms-blob-type": "BlockBlob",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
            "Content-MD5": encoded_md5,
            "x-ms-blob-content-md5": encoded_md5,
            "User-Agent": self._user_agent,
            **headers,
        }
        for retry in range(self._budget.retries + 1):
            last = retry == self._budget.retries
            try:
                status, response_headers, body = self._send(url, data, fixed)
            except (ServiceRequestError, ServiceResponseError):
                if last:
                    raise
            else:
                if 200 <= status < 300:
                    return
                error = _error(status, response_headers, body)
                if last or status not in _RETRY_STATUSES:
                    raise error
            time.sleep(self._wait_before(retry))

    def close(self) -> None:
        self._pool.clear()

    def _send(
        self, url: str, data: bytes, headers: dict[str, str]
    ) -> tuple[int, urllib3.HTTPHeaderDict, bytes]:
        request = HttpRequest(
            "PUT",
            url,
            headers={
                **headers,
                "x-ms-date": formatdate(usegmt=True),
                "x-ms-client-request-id": str(uuid.uuid1()),
            },
        )
        self._sign(PipelineRequest(request, PipelineContext(None)))
        try:
            response = self._pool.request(
                "PUT",
                url,
                body=data,
                headers=dict(request.headers),
                timeout=self._timeout,
                retries=False,
                redirect=False,
            )
        except _NOT_SENT as exc:  # no byte of the request reached storage
            raise ServiceRequestError(str(exc), error=exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # A read timeout, a reset, a truncated answer: the request may have landed.
            raise ServiceResponseError(str(exc), error=exc) from exc
        return response.status, response.headers, response.data

    def _wait_before(self, retry: int) -> float:
        """The budget's wait before this retry, with its jitter."""
        jitter = self._budget.backoff_s / 2
        return max(0.0, self._budget.wait_before_retry(retry) + random.uniform(-jitter, jitter))


def _pool(url: str) -> urllib3.PoolManager:
    """A pool that takes the proxy and CA bundle the environment names, as the SDK does."""
    environment = environment_once(url)
    # requests' default bundle when the environment names none, as the SDK verifies
    bundle = environment.get("connection_verify") or certifi.where()
    options: dict[str, Any] = {"maxsize": 4, "block": False, "ca_certs": bundle}
    proxy = (environment.get("proxies") or {}).get(url.split(":", 1)[0]) or (
        environment.get("proxies") or {}
    ).get("all")
    if proxy:
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def _error(status: int, headers: urllib3.HTTPHeaderDict, body: bytes) -> HttpResponseError:
    """The exception the SDK raises for this answer, with its status and storage error code."""
    code = headers.get("x-ms-error-code", "")
    reason = _message(body) or code or f"HTTP {status}"
    kind = _EXCEPTION_FOR_STATUS.get(status, HttpResponseError)
    if code == "ConditionNotMet":
        kind = ResourceModifiedError
    error = kind(message=f"{reason}\nErrorCode:{code}" if code else reason)
    error.status_code = status
    error.error_code = code  # type: ignore[attr-defined]
    error.reason = code or None
    return error


def _message(body: bytes) -> str:
    """The ``<Message>`` of a storage error body, first line only."""
    text = body.decode("utf-8", "replace")
    start = text.find("<Message>")
    end = text.find("</Message>", start)
    if start < 0 or end < 0:
        return ""
    return text[start + len("<Message>") : end].strip().splitlines()[0]
