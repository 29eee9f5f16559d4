"""Azure Blob Storage: choosing credentials at startup, and uploading a file.

The parent runs :func:`choose_auth` once before it serves: DefaultAzureCredential
first (managed or workload identity, no secrets), then the connection string,
then the account name and key. Each candidate must read the container's
properties within a bounded time. The winner's *name* goes to the children,
which build their own client: a credential object does not cross a process
boundary, and each uploader wants its own connection pool anyway.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobClient,
    BlobType,
    ContainerClient,
    ContentSettings,
    StandardBlobTier,
)
from azure.storage.blob._shared.policies import ExponentialRetry

from ingestd.config import Settings
from ingestd.ratelimit import TokenBucket

log = logging.getLogger(__name__)

DEFAULT_CREDENTIAL = "DefaultAzureCredential"
CONNECTION_STRING = "connection string"
ACCOUNT_KEY = "account key"

STORAGE_SCOPE = "https://storage.azure.com/.default"
FALLBACK_KEYS = "APP_AZURE_CONNECTION_STRING, or APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY"


class AuthError(Exception):
    """No credential could reach the container: the service must not start."""


@dataclass(frozen=True)
class Outcome:
    """How one credential fared in the startup check."""

    method: str
    ok: bool
    reason: str = ""
    fatal: bool = False  # the container is reachable but wrong; fallbacks cannot help


# Clients


def _transport_options(settings: Settings, startup: bool) -> dict:
    """Timeouts and retries for a client.

    The SDK's default retry waits 15 s, then more, before a network error
    surfaces; uploads would stop beating for over a minute and be killed as
    stalled. Short, few retries here; the supervisor retries the file.
    """
    if startup:
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=0)
        return {"retry_policy": retry, "connection_timeout": 5, "read_timeout": 10}
    retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=3)
    return {
        "retry_policy": retry,
        "connection_timeout": 10,
        "read_timeout": 60,
        "max_block_size": settings.azure_max_block_size,
        "max_single_put_size": settings.azure_max_single_put_size,
    }


def _credential_options(startup: bool) -> dict:
    """Timeouts and retries for DefaultAzureCredential's own token requests.

    The credential fetches tokens through its own HTTP pipeline, which the
    storage client's timeouts do not bound: with the defaults a token
    endpoint that accepts and never answers holds a request for 4 x 300 s.
    At startup one short try (a crash-looping pod is the retry). In the
    uploaders a few tries whose worst case (3 x 15 s) stays under the
    default ``APP_CHILD_STALL_TIMEOUT_S`` (60 s), so a hung token endpoint
    surfaces as an upload error (an outage) instead of a stalled child.
    """
    if startup:
        return {"connection_timeout": 5, "read_timeout": 10, "retry_total": 0}
    return {"connection_timeout": 5, "read_timeout": 15, "retry_total": 2}


def container_client(settings: Settings, method: str, startup: bool = False) -> ContainerClient:
    """A client for the configured container using ``method``'s credential.

    For DefaultAzureCredential the SDK asks for a token whenever the one it
    holds has less than about five minutes left, so long uploads carry on
    across token expiry (tests/test_auth.py shows it with 3 s tokens).
    """
    options = _transport_options(settings, startup)
    if method == DEFAULT_CREDENTIAL:
        from azure.identity import DefaultAzureCredential

        return ContainerClient(
            settings.azure_account_url,
            settings.azure_container,
            credential=DefaultAzureCredential(**_credential_options(startup)),
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


# Startup check


def candidates(settings: Settings) -> list[tuple[str, str | None]]:
    """Each method in order of preference, with why it cannot be tried (or None)."""
    key_missing = [
        name
        for name, value in (
            ("APP_AZURE_ACCOUNT_NAME", settings.azure_account_name),
            ("APP_AZURE_ACCOUNT_KEY", settings.azure_account_key),
        )
        if not value
    ]
    return [
        (DEFAULT_CREDENTIAL, None),
        (
            CONNECTION_STRING,
            None if settings.azure_connection_string else "APP_AZURE_CONNECTION_STRING is not set",
        ),
        (ACCOUNT_KEY, None if not key_missing else " and ".join(key_missing) + " not set"),
    ]


def choose_auth(settings: Settings) -> str:
    """Return the first method that can read the container, or raise :class:`AuthError`.

    The whole check is bounded by ``APP_AZURE_STARTUP_TIMEOUT_S`` even when an
    endpoint accepts the connection and never answers: each attempt runs in a
    daemon thread that is abandoned when its share of the time is up.
    """
    deadline = time.monotonic() + settings.azure_startup_timeout_s
    usable = [(m, why) for m, why in candidates(settings)]
    report: list[str] = []
    remaining_attempts = sum(1 for _, why in usable if why is None)
    for method, why_not in usable:
        if why_not is not None:
            report.append(f"{method}: not configured ({why_not})")
            continue
        budget = max(1.0, (deadline - time.monotonic()) / remaining_attempts)
        remaining_attempts -= 1
        outcome = _bounded(settings, method, budget)
        if outcome.ok:
            fallback_note = f" after {'; '.join(report)}" if report else ""
            log.info("Azure auth: using %s%s", method, fallback_note)
            return method
        log.warning("Azure auth: %s failed: %s", method, outcome.reason)
        report.append(f"{method}: {outcome.reason}")
        if outcome.fatal:
            break
    raise AuthError(
        f"no usable Azure credentials for container {settings.azure_container!r} at "
        f"{settings.azure_account_url}. Tried: " + "; ".join(report) + ". "
        f"Fix the managed/workload identity (AZURE_CLIENT_ID, AZURE_TENANT_ID, "
        f"AZURE_FEDERATED_TOKEN_FILE, role 'Storage Blob Data Contributor') or set "
        f"{FALLBACK_KEYS}."
    )


TOKEN_STEP = "token"
CONTAINER_STEP = "container"


def _bounded(settings: Settings, method: str, seconds: float) -> Outcome:
    """Run :func:`check` in a daemon thread; give up on it after ``seconds``.

    The thread cannot be cancelled, only abandoned; the short timeouts of
    the startup clients make it end soon after by itself.
    """
    result: list[Outcome] = []
    step = [CONTAINER_STEP]  # what the check is waiting for, for the message

    def target() -> None:
        try:
            result.append(check(settings, method, step))
        except Exception as exc:  # the check reports every failure as an Outcome
            result.append(Outcome(method, False, describe_error(exc, method)))

    thread = threading.Thread(target=target, name=f"auth-check-{method}", daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if result:
        return result[0]
    if step[0] == TOKEN_STEP:
        reason = (f"no answer within {seconds:.0f} s from the token endpoint (it accepted "
                  "the connection but did not answer): check the workload/managed "
                  "identity endpoint and the egress to it")
    elif method == CONNECTION_STRING:
        reason = (f"no answer within {seconds:.0f} s from the blob endpoint in "
                  "APP_AZURE_CONNECTION_STRING (it accepted the connection but did not "
                  "answer): check that endpoint and the network path to it")
    else:
        reason = (f"no answer within {seconds:.0f} s from {settings.azure_account_url} (it "
                  "accepted the connection but did not answer): check APP_AZURE_ACCOUNT_URL "
                  "and the network path to it (private endpoint, firewall, DNS, proxy)")
    return Outcome(method, False, reason)


def check(settings: Settings, method: str, step: list[str] | None = None) -> Outcome:
    """Can ``method`` read the container's properties?

    ``step[0]`` is kept up to date with what the check is waiting for
    (``TOKEN_STEP`` or ``CONTAINER_STEP``), so a caller that gives up on
    it can say which endpoint hung.
    """
    step = step if step is not None else [CONTAINER_STEP]
    if method == DEFAULT_CREDENTIAL and not settings.azure_account_url.startswith("https://"):
        return Outcome(method, False, "token credentials need an https:// APP_AZURE_ACCOUNT_URL")
    if method == ACCOUNT_KEY:
        reason = _bad_key(settings)
        if reason:
            return Outcome(method, False, reason)
    client = container_client(settings, method, startup=True)
    try:
        if method == DEFAULT_CREDENTIAL:
            step[0] = TOKEN_STEP
            try:
                client.credential.get_token(STORAGE_SCOPE)
            except Exception as exc:  # whatever the class: the token is what failed
                return Outcome(method, False, f"could not get a token: {_squash(exc)}")
            step[0] = CONTAINER_STEP
        client.get_container_properties()
    except ResourceNotFoundError as exc:
        return Outcome(
            method,
            False,
            f"container {settings.azure_container!r} does not exist ({_code(exc)}); "
            "create it or fix APP_AZURE_CONTAINER",
            fatal=True,
        )
    except Exception as exc:
        return Outcome(method, False, describe_error(exc, method))
    finally:
        client.close()
    return Outcome(method, True)


def _bad_key(settings: Settings) -> str | None:
    assert settings.azure_account_key is not None
    try:
        base64.b64decode(settings.azure_account_key.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        return "APP_AZURE_ACCOUNT_KEY is not valid base64; copy the key from the storage account"
    return None


def _code(exc: HttpResponseError) -> str:
    code = exc.error_code or exc.reason
    return f"{exc.status_code} {getattr(code, 'value', code)}"


_WHAT_TO_CHECK = {
    DEFAULT_CREDENTIAL: "check the identity's token (tenant, audience https://storage.azure.com)",
    CONNECTION_STRING: "check the AccountKey in APP_AZURE_CONNECTION_STRING",
    ACCOUNT_KEY: "check APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY",
}
_REJECTED = {"AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo",
             "NoAuthenticationInformation"}


def _rejected(exc: BaseException) -> bool:
    """Storage refused the credential itself (classified by status and code, not class).

    A wrong shared key is 403 AuthenticationFailed on Azure and 403
    AuthorizationFailure on Azurite, or 400 InvalidAuthenticationInfo when
    Azurite also accepts OAuth; a token for the wrong audience or tenant is
    401/403 as a ClientAuthenticationError.
    """
    if not isinstance(exc, HttpResponseError):
        return False
    error_code = exc.error_code
    code = str(getattr(error_code, "value", error_code) or "")
    return exc.status_code == 401 or (exc.status_code in (400, 403) and code in _REJECTED)


def describe_error(exc: BaseException, method: str | None = None) -> str:
    """One line that says what went wrong and what to look at, without secrets."""
    what_to_check = _WHAT_TO_CHECK.get(method or "", "check the credential")
    if _rejected(exc):
        return f"storage rejected the {method or 'credential'} ({_code(exc)}): {what_to_check}"
    if isinstance(exc, ClientAuthenticationError) and not exc.status_code:
        return f"could not get a token: {_squash(exc.message)}"
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        return f"access denied ({_code(exc)}): grant the identity a data role on the container"
    if isinstance(exc, HttpResponseError) and exc.status_code:
        return f"storage error {_code(exc)}: {_first_line(exc.message)}"
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return (f"cannot reach the blob endpoint: {_first_line(str(exc))}; check "
                "APP_AZURE_ACCOUNT_URL and the network path to it")
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


def is_outage(exc: BaseException) -> bool:
    """True when the endpoint was unreachable, overloaded or refused our credential.

    Such failures say nothing about the file, so they must not count
    towards its attempts (an outage is not a poison file).
    """
    if isinstance(exc, (ServiceRequestError, ServiceResponseError, ClientAuthenticationError)):
        return True
    status = getattr(exc, "status_code", None) or 0
    return _rejected(exc) or (
        isinstance(exc, HttpResponseError) and (status >= 500 or status in (401, 403, 408, 429)))


def _squash(text: object, limit: int = 800) -> str:
    """A multi-line SDK message (DefaultAzureCredential lists every link) on one line."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())[:limit]


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


# Upload


@dataclass(frozen=True)
class Staged:
    """What staging learnt about a file, in the one pass that copied it.

    ``block_md5s`` has one digest per ``APP_AZURE_MAX_BLOCK_SIZE`` block (empty
    when the file goes in one request); ``data`` holds the whole file only
    when it goes in one request (at most ``APP_AZURE_MAX_SINGLE_PUT_SIZE``).
    ``md5`` is the whole file's, None when it was not computed
    (``APP_AZURE_PUT_MD5`` off and the file goes in blocks). ``source`` is
    the (size, mtime_ns, inode) of the version of the NFS file that was read
    (its mtime also goes into the blob's provenance), ``staged_ino`` the
    staging copy's inode: cleanup deletes only those.
    """

    size: int
    md5: bytes | None
    block_md5s: tuple[bytes, ...] = ()
    data: bytes | None = None
    source: tuple[int, int, int] = (0, 0, 0)
    staged_ino: int | None = None

    @property
    def mtime_ns(self) -> int:
        return self.source[1]


def access_tier(settings: Settings) -> StandardBlobTier | None:
    """The tier to set at commit, or None for the account's default.

    The SDK wants its enum (a plain str fails inside it); config already
    normalised the spelling, so the lookup cannot fail.
    """
    tier = settings.azure_access_tier
    return StandardBlobTier(tier) if tier else None


READ_SIZE = 128 * 1024
"""Bytes per read when a block's body is sent from the staging file. The HTTP
stack asks for 32 KiB at a time; answering with more means a few dozen
read/send rounds per block instead of hundreds (about as cheap as larger
reads), and only this much of a block is ever in memory, per block thread.
Figures: bench/RESULTS.md."""

_read_buffers = threading.local()


class FileRange:
    """A seekable, read-only view of ``length`` bytes at ``offset`` of an open file.

    It reads with ``os.preadv`` into a buffer of ``READ_SIZE`` owned by the
    calling thread, so many blocks of one file go out in parallel from one
    descriptor without a shared position or a lock, nothing is allocated per
    read, and nothing but the chunk being sent is in memory (a fresh bytes
    object per read leaves more behind in malloc's per-thread arenas). ``read``
    returns a view of that buffer, valid until the same thread's next read: the
    HTTP stack sends each chunk before it asks for the next. ``read(size)`` may
    return up to ``READ_SIZE`` bytes even when asked for fewer (urllib3 and
    http.client send whatever they get). Seekable so the SDK's retry policy can
    rewind it; ``__len__`` gives requests the Content-Length. ``on_read`` is
    called after every read: the HTTP stack reads only as fast as the socket
    takes the bytes, so it is a heartbeat from inside a block's upload, however
    large the block. ``bucket``, when given, is the uploader's share of the rate
    cap: each read first waits for its budget, beating (``on_read``) while it
    waits.
    """

    def __init__(self, fd: int, offset: int, length: int,
                 on_read: Callable[[], None] | None = None,
                 bucket: TokenBucket | None = None) -> None:
        self._fd = fd
        self._offset = offset
        self._length = length
        self._pos = 0
        self._on_read = on_read
        self._bucket = bucket

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + offset), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes | memoryview:
        left = self._length - self._pos
        want = left if size is None or size < 0 else min(left, max(size, READ_SIZE))
        if want <= 0:
            return b""
        if self._bucket is not None:
            self._bucket.take(want, self._on_read)
        data: bytes | memoryview
        if want > READ_SIZE:  # read() of the whole range: not what the HTTP stack does
            data = os.pread(self._fd, want, self._offset + self._pos)
        else:
            buffer = getattr(_read_buffers, "buffer", None)
            if buffer is None:
                buffer = _read_buffers.buffer = memoryview(bytearray(READ_SIZE))
            data = buffer[:os.preadv(self._fd, [buffer[:want]], self._offset + self._pos)]
        if not len(data):
            raise OSError(f"staging file shorter than expected at {self._offset + self._pos}")
        self._pos += len(data)
        if self._on_read is not None:
            self._on_read()
        return data


MAX_BLOCKS_AHEAD = 256
"""Blocks queued for upload at most (each is a few small objects, no data):
the staging copy may run this far ahead of the upload."""


class BlockUpload:
    """The blocks of one blob, staged in parallel as soon as each is on local disk.

    :meth:`add` is called for each block, in order, once its bytes are in
    the staging file (which may still be growing) and its MD5 is known; the
    block goes out on one of the pool's threads, at most
    ``APP_AZURE_MAX_CONCURRENCY`` at a time, streamed from the staging file
    with that MD5 as its Content-MD5. :meth:`commit` waits for every block
    and commits exactly this attempt's list.

    A block's ID is its MD5 and its index (all IDs the same length), not a
    fresh random one. Two uploads of the same bytes to the same blob (a
    replica whose recovery takes a file another replica is still uploading)
    then name every block alike, so whichever commits last still finds all
    its blocks: with random IDs the first commit discards the other's staged
    blocks and its commit fails (400 InvalidBlockList). A block left by an
    earlier, interrupted attempt is only reused if its bytes are the same.
    """

    def __init__(self, client: ContainerClient, settings: Settings, blob_name: str, path: str,
                 pool: ThreadPoolExecutor, progress: Callable[[int, int | None], None],
                 bucket: TokenBucket | None = None,
                 on_wait: Callable[[], None] | None = None) -> None:
        self.client = client
        self.blob_name = blob_name
        self._blob: BlobClient | None = None
        self.path = path
        self.pool = pool
        self.progress = progress
        self.bucket = bucket
        self.on_wait = on_wait
        self._activity = 0  # bumped by every block read and budget wait
        self.window = settings.azure_max_concurrency
        self.tier = access_tier(settings)
        self.block_ids: list[str] = []
        self.pending: set[Future] = set()
        self.uploaded = 0
        self.total: int | None = None
        self.started: float | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None

    @property
    def blob(self) -> BlobClient:
        """The blob's client, made on first use: a file sent in one request
        (``put_whole``) never needs it, and making one is a good part of the
        per-file cost of small files (its own pipeline and configuration)."""
        if self._blob is None:
            self._blob = self.client.get_blob_client(self.blob_name)
        return self._blob

    def add(self, offset: int, length: int, md5: bytes) -> None:
        """Queue the next block; raises the error of any block that already failed."""
        self._collect(block=False)
        while len(self.pending) >= MAX_BLOCKS_AHEAD:
            self._wait_for_room()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self.started = time.monotonic()
            self.blob  # made here, before any block thread needs it
        block_id = f"{md5.hex()}{len(self.block_ids):08d}"
        self.block_ids.append(block_id)
        self.pending.add(self.pool.submit(self._put, block_id, offset, length, md5))

    def _put(self, block_id: str, offset: int, length: int, md5: bytes) -> None:
        assert self._fd is not None
        body = FileRange(self._fd, offset, length, self._sending, self.bucket)
        self.blob.stage_block(block_id, body, length=length,
                              transactional_content_md5=bytearray(md5))
        with self._lock:
            self.uploaded += length
            done = self.uploaded
        self.progress(done, self.total)

    def _sending(self) -> None:
        """A block is going out (or waiting for its budget): beat (the channel keeps
        this to one per 0.25 s), so a slow link with large blocks never looks like
        a stalled uploader."""
        self._activity += 1
        self.progress(self.uploaded, self.total)

    def _wait_for_room(self) -> None:
        """The copy is ``MAX_BLOCKS_AHEAD`` blocks ahead: wait for one to finish.

        Under a low rate cap that can take longer than the stall timeout. The
        copy loop then beats (``on_wait``) for as long as the block threads
        show activity (reads, budget waits), and only then: blocks stuck in a
        syscall still let the uploader be seen as stalled.
        """
        seen = self._activity
        self._collect(block=True, timeout=1.0)
        if self._activity != seen and self.on_wait is not None:
            self.on_wait()

    def _collect(self, block: bool, timeout: float | None = None) -> None:
        if not self.pending:
            return
        finished, self.pending = wait(self.pending, timeout=timeout if block else 0,
                                      return_when=FIRST_COMPLETED)
        for future in finished:
            future.result()  # raises the block's error

    def commit(self, size: int, md5: bytes | None,
               metadata: dict[str, str] | None = None) -> None:
        """Wait for every block, then commit them, with the whole file's MD5 if known.

        The tier and the metadata go in the commit itself: a blob that exists
        has them, with no window where a second call has not happened yet.
        """
        self.total = size
        while self.pending:
            self._collect(block=True)
        settings = ContentSettings(content_md5=bytearray(md5)) if md5 is not None else None
        self.blob.commit_block_list(self.block_ids, content_settings=settings,
                                    metadata=metadata, standard_blob_tier=self.tier)

    def close(self) -> None:
        """Cancel what has not started, wait for what has, release the file."""
        for future in self.pending:
            future.cancel()
        if self.pending:
            wait(self.pending)  # no block thread may outlive the descriptor
        self.pending = set()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def put_whole(client: ContainerClient, blob_name: str, path: str, staged: Staged,
              tier: StandardBlobTier | None = None,
              metadata: dict[str, str] | None = None) -> None:
    """One Put Blob request: the file's bytes (kept by staging, else read), MD5-checked,
    with the tier and metadata set in the same request.

    The MD5 computed while staging is both the request's Content-MD5 (storage
    rejects the request if the bytes differ) and the blob's stored MD5; the
    SDK's ``validate_content`` would hash the file a second time for the same
    header.
    """
    data = staged.data
    assert staged.md5 is not None, "staging always hashes a file that goes in one request"
    if data is None:
        with open(path, "rb") as stream:
            data = stream.read()
    md5 = bytearray(staged.md5)
    client.get_blob_client(blob_name).upload_blob(
        data, blob_type=BlobType.BLOCKBLOB, length=len(data), overwrite=True,
        transactional_content_md5=md5, content_settings=ContentSettings(content_md5=md5),
        standard_blob_tier=tier, metadata=metadata)
