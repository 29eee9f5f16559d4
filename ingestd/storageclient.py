"""Building a ContainerClient for one auth method, with bounded network waits.

Used by both sides. The parent's startup check (:mod:`ingestd.auth`) builds
a client per candidate, with one short try. Each uploader builds its own
from the name of the method the parent chose (a credential object does not
cross a process boundary, and each uploader wants its own connection pool
anyway), with every wait bounded by :class:`NetworkBudget`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from azure.storage.blob import ContainerClient
from azure.storage.blob._shared.base_client import parse_connection_str
from azure.storage.blob._shared.policies import ExponentialRetry
from requests.utils import get_environ_proxies

from ingestd.config import Settings
from ingestd.storageerrors import CONNECTION_STRING, DEFAULT_CREDENTIAL


@dataclass(frozen=True)
class NetworkBudget:
    """Every network wait of an uploader's requests, derived from one setting.

    The one documented place for the SDK's timeouts (README, "Timeouts").
    All of them follow ``APP_CHILD_STALL_TIMEOUT_S`` so that each single wait
    (a connect, a read, a backoff between retries) is shorter than it, and a
    request with all its retries ends, with the defaults, within it:

    * connect: stall / 6, between 1 and 10 s (default 10 s);
    * read (no byte of the answer for this long): stall / 4, between 3 and 30 s
      (default 15 s; the SDK's own is 60 s, as long as the old stall timeout);
    * retries: 2, waiting ``backoff`` then ``backoff + 2`` s, jitter
      ``backoff / 2`` (the SDK's default first wait is 15 s, jitter 3 s);
      backoff is stall / 15, between 0.5 and 4 s (default 4 s).

    With the defaults a blackholed endpoint fails a request after at most
    3 x 15 + 4 + 6 (+ 5 jitter) = 60 s, a refusing one after about 10 s.
    A network wait never gets an uploader killed (its work loop beats while
    it waits, see :class:`ingestd.messages.Beat`); these bounds only make a
    failure surface, as an outage, after a known time.
    """

    connect_s: float
    read_s: float
    backoff_s: float
    retries: int = 2

    @classmethod
    def of(cls, settings: Settings) -> NetworkBudget:
        stall = settings.child_stall_timeout_s
        return cls(
            connect_s=_clamp(stall / 6, 1.0, 10.0),
            read_s=_clamp(stall / 4, 3.0, 30.0),
            backoff_s=_clamp(stall / 15, 0.5, 4.0),
        )

    def retry_policy(self) -> ExponentialRetry:
        # The policy computes in floats (sub-second backoffs work); its stub says int.
        return ExponentialRetry(
            initial_backoff=self.backoff_s,  # type: ignore[arg-type]
            increment_base=2,
            retry_total=self.retries,
            random_jitter_range=self.backoff_s / 2,  # type: ignore[arg-type]
        )

    def wait_before_retry(self, retry: int) -> float:
        """The wait before retry ``retry`` (0 for the first), before its jitter (backoff / 2)."""
        return self.backoff_s + (2**retry if retry else 0)

    def worst_case_s(self) -> float:
        """A request that gets no answer at all: every try reads until its timeout."""
        waits = sum(self.wait_before_retry(n) + self.backoff_s / 2 for n in range(self.retries))
        return (self.retries + 1) * self.read_s + waits


def _clamp(value: float, low: float, high: float) -> float:
    return round(min(high, max(low, value)), 3)


def environment_once(account_url: str) -> dict[str, Any]:
    """The proxy and CA bundle the environment names for ``account_url``, read once.

    By default the SDK's transport (requests, ``trust_env``) reads them again
    on every request: it walks the whole environment for ``*_proxy``
    variables, checks ``NO_PROXY`` and looks for a ``~/.netrc``. With the
    180 variables of a pod that has service links, that is 0.43 ms of CPU
    per request, a quarter of what a small file's Put Blob costs in the SDK
    (1.7 against 1.3 ms, measured against Azurite). A process's environment
    does not change, and every request of a client goes to its one account
    host, so resolving the same rules here once gives the same proxy
    (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, unless ``NO_PROXY``
    covers the host) and the same CA bundle (``REQUESTS_CA_BUNDLE``, else
    ``CURL_CA_BUNDLE``), and ``~/.netrc`` is never consulted (the SDK signs
    every request itself).
    """
    options: dict[str, Any] = {"use_env_settings": False}
    proxies = get_environ_proxies(account_url)
    if proxies:
        options["proxies"] = proxies
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        options["connection_verify"] = bundle
    return options


def _endpoint(settings: Settings, method: str) -> str:
    """The URL the client for ``method`` sends to (a connection string names its own)."""
    if method == CONNECTION_STRING and settings.azure_connection_string is not None:
        secret = settings.azure_connection_string.get_secret_value()
        return str(parse_connection_str(secret, None, "blob")[0])
    return settings.azure_account_url


def _transport_options(settings: Settings, startup: bool, url: str) -> dict[str, Any]:
    """Timeouts and retries for a client, and the environment's proxy and CA bundle.

    At startup one short try (a crash-looping pod is the retry). In the
    uploaders, :class:`NetworkBudget`; the supervisor retries the file.
    """
    environment = environment_once(url)
    if startup:
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=0)
        return {
            "retry_policy": retry,
            "connection_timeout": 5,
            "read_timeout": 10,
            **environment,
        }
    budget = NetworkBudget.of(settings)
    return {
        **environment,
        "retry_policy": budget.retry_policy(),
        "connection_timeout": budget.connect_s,
        "read_timeout": budget.read_s,
        "max_block_size": settings.azure_max_block_size,
        "max_single_put_size": settings.azure_max_single_put_size,
    }


def _credential_options(settings: Settings, startup: bool) -> dict[str, Any]:
    """Timeouts and retries for DefaultAzureCredential's own token requests.

    The credential fetches tokens through its own HTTP pipeline, which the
    storage client's timeouts do not bound: with the defaults a token
    endpoint that accepts and never answers holds a request for 4 x 300 s.
    At startup one short try. In the uploaders the same budget as storage
    requests (:class:`NetworkBudget`), so a hung token endpoint surfaces as
    an upload error (auth failing) after a known time.
    """
    if startup:
        return {"connection_timeout": 5, "read_timeout": 10, "retry_total": 0}
    budget = NetworkBudget.of(settings)
    return {
        "connection_timeout": budget.connect_s,
        "read_timeout": budget.read_s,
        "retry_total": budget.retries,
    }


def container_client(settings: Settings, method: str, startup: bool = False) -> ContainerClient:
    """A client for the configured container using ``method``'s credential.

    For DefaultAzureCredential the SDK asks for a token whenever the one it
    holds has less than about five minutes left, so long uploads carry on
    across token expiry (tests/test_auth.py shows it with 3 s tokens).
    """
    options = _transport_options(settings, startup, _endpoint(settings, method))
    if method == DEFAULT_CREDENTIAL:
        from azure.identity import DefaultAzureCredential

        return ContainerClient(
            settings.azure_account_url,
            settings.azure_container,
            credential=DefaultAzureCredential(**_credential_options(settings, startup)),
            **options,
        )
    if method == CONNECTION_STRING:
        assert settings.azure_connection_string is not None
        return ContainerClient.from_connection_string(
            settings.azure_connection_string.get_secret_value(),
            settings.azure_container,
            **options,
        )
    assert settings.azure_account_name and settings.azure_account_key is not None
    credential = {
        "account_name": settings.azure_account_name,
        "account_key": settings.azure_account_key.get_secret_value(),
    }
    return ContainerClient(
        settings.azure_account_url, settings.azure_container, credential=credential, **options
    )
