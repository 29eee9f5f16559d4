"""Azurite's development account and loopback ports: plain constants, no pytest.

The one place the well-known Azurite key is written down. The test support,
the benchmark (``bench/azurite.py``) and the local quick start
(``scripts/run-local``, ``scripts/list-blobs``) all read it from here, so this
module imports nothing beyond the standard library.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
ACCOUNT_NAME = "devstoreaccount1"
# The well-known, public development key that Azurite ships with: not a secret.
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now.

    Another process may take it before the caller binds it; callers that start
    a server on it (``Azurite.start``) retry on EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def account_url(port: int, scheme: str = "http") -> str:
    """Path-style account URL, as Azurite wants it: ``http://127.0.0.1:PORT/devstoreaccount1``."""
    return f"{scheme}://{LOOPBACK}:{port}/{ACCOUNT_NAME}"


def connection_string(blob_endpoint: str) -> str:
    """Shared-key connection string of the dev account for ``blob_endpoint``.

    The endpoint may be Azurite's own account URL or a proxy in front of it;
    the protocol is taken from its scheme.
    """
    scheme = urlsplit(blob_endpoint).scheme or "http"
    return (
        f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT_NAME};"
        f"AccountKey={ACCOUNT_KEY};BlobEndpoint={blob_endpoint};"
    )
