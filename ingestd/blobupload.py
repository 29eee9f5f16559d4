"""The uploader child's side of storage: putting one file into its blob.

:class:`BlockUpload` sends a file's blocks in parallel, each as soon as it
is on local disk (streamed from the staging file by :class:`FileRange`),
and commits them; :func:`put_whole` sends a small file in one request.
Either can commit only if the blob is unchanged since :func:`blob_version`
looked. Only the uploaders (:mod:`ingestd.uploader`) use this module; the
parent never imports it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import (
    BlobClient,
    ContainerClient,
    ContentSettings,
    StandardBlobTier,
)

from ingestd.childruntime import FileCalls
from ingestd.config import Settings
from ingestd.putblob import PutBlob
from ingestd.ratelimit import TokenBucket
from ingestd.storageerrors import error_code


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


class FileRange:
    """A seekable, read-only view of ``length`` bytes at ``offset`` of an open file.

    It reads with ``os.preadv`` into a buffer of ``READ_SIZE`` of its own,
    so many blocks of one file go out in parallel from one descriptor
    without a shared position or a lock, nothing is allocated per read, and
    nothing but the chunk being sent is in memory. The buffer is an
    anonymous mapping, not malloc's: it is unmapped when the range is
    dropped, so an uploader's memory after a large file goes back to what
    it was (malloc's per-thread arenas kept a per-thread buffer, or fresh
    bytes objects, resident: 1 MiB per uploader that ran blocks, measured
    in bench/RESULTS.md, "Memory"). ``read`` returns a view of that buffer,
    valid until the next read: the HTTP stack sends each chunk before it
    asks for the next. ``read(size)`` may return up to ``READ_SIZE`` bytes even when
    asked for fewer (urllib3 and http.client send whatever they get).
    Seekable so the SDK's retry policy can rewind it; ``__len__`` gives
    requests the Content-Length. ``on_read`` is called after every read:
    the HTTP stack reads only as fast as the socket takes the bytes, so it
    is a heartbeat from inside a block's upload, however large the block.
    ``bucket``, when given, is the uploader's share of the rate cap: each read
    first waits for its budget, beating (``on_read``) while it waits.
    ``file_calls``, when given, records each ``pread`` while it runs (see
    :class:`ingestd.childruntime.FileCalls`): a block thread stuck on a frozen
    staging disk must still get the uploader killed, although the work loop
    keeps beating while it waits for the blocks.
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        on_read: Callable[[], None] | None = None,
        bucket: TokenBucket | None = None,
        file_calls: FileCalls | None = None,
    ) -> None:
        self._fd = fd
        self._offset = offset
        self._length = length
        self._pos = 0
        self._on_read = on_read
        self._bucket = bucket
        self._buffer: memoryview | None = None
        self._track = file_calls.track if file_calls is not None else contextlib.nullcontext

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
        with self._track():
            if want > READ_SIZE:  # read() of the whole range: not what the HTTP stack does
                data = os.pread(self._fd, want, self._offset + self._pos)
            else:
                if self._buffer is None:  # mapped, not malloc'ed: unmapped with the range
                    self._buffer = memoryview(mmap.mmap(-1, READ_SIZE))
                buffer = self._buffer
                data = buffer[: os.preadv(self._fd, [buffer[:want]], self._offset + self._pos)]
        if not len(data):
            raise OSError(f"staging file shorter than expected at {self._offset + self._pos}")
        self._pos += len(data)
        if self._on_read is not None:
            self._on_read()
        return data


MAX_BLOCKS_AHEAD = 256
"""Blocks queued for upload at most (each is a few small objects, no data):
the staging copy may run this far ahead of the upload."""


WAKE_S = 1.0
"""The work loop waits for blocks and requests in slices this long, beating
between them: a network wait shows as alive, never as a stall."""

Blocks = dict[str, int]
"""Block ID -> size: the blocks storage already holds for a blob."""

Runner = Callable[[Callable[[], object]], object]
"""Runs a network call for the work loop: by default in place; the uploader's
runs it on a side thread and beats (waiting on "network") until it returns."""


def _in_place(call: Callable[[], object]) -> object:
    return call()


def block_id(md5: bytes, index: int) -> str:
    """A block's ID: its content's MD5 and its position (every ID the same length)."""
    return f"{md5.hex()}{index:08d}"


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
    blocks and its commit fails (400 InvalidBlockList).

    The same IDs make an interrupted upload resumable without a plan file:
    the blob's uncommitted block list *is* the plan. :meth:`list_existing`
    asks for it (Azure keeps uncommitted blocks for 7 days) on the network
    thread while the copy goes on; blocks added before the answer wait for
    it, and then every block whose ID (so bytes, position and, checked too,
    size) is already there is skipped. A block of an earlier, different
    version of the file has another MD5, so another ID, and is never
    committed.

    Every wait of the work loop here (for room in the window, for the
    blocks before the commit, for running blocks on close) wakes every
    ``WAKE_S`` and calls ``on_wait`` (a beat saying "network"); a block
    thread stuck reading a frozen staging disk is caught through
    ``file_calls`` instead (see :class:`FileRange`).
    """

    def __init__(
        self,
        client: ContainerClient,
        settings: Settings,
        blob_name: str,
        path: str,
        pool: ThreadPoolExecutor,
        progress: Callable[[int, int | None], None],
        bucket: TokenBucket | None = None,
        on_wait: Callable[[], None] | None = None,
        run: Runner = _in_place,
        file_calls: FileCalls | None = None,
        submit: Callable[[Callable[[], Blocks]], Future[Blocks]] | None = None,
        on_listed: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.blob_name = blob_name
        self._blob: BlobClient | None = None
        self.path = path
        self.pool = pool
        self.progress = progress
        self.bucket = bucket
        self.on_wait = on_wait or (lambda: None)
        self.run = run
        self.file_calls = file_calls
        self.window = settings.azure_max_concurrency
        self.tier = access_tier(settings)
        self.block_ids: list[str] = []
        self.pending: set[Future[None]] = set()
        self.existing: dict[str, int] = {}  # block ID -> size, already held by storage
        self.listing: Future[Blocks] | None = None  # the block list, while it is being asked for
        self.held: list[tuple[str, int, int, bytes]] = []  # blocks waiting for that answer
        self.submit_request = submit
        self.on_listed = on_listed or (lambda: None)
        self.uploaded = 0  # bytes of this file known to be in storage (sent or found)
        self.skipped = 0  # of which found there, not sent
        self.total: int | None = None
        self.started: float | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.acked: list[tuple[int, int]] | None = None  # see track_acks

    def track_acks(self) -> None:
        """Record each block storage acknowledged (or already held), for :meth:`take_acked`.

        A staging window releases a block's space only once it is in storage.
        """
        self.acked = []

    def take_acked(self) -> list[tuple[int, int]]:
        """The (offset, length) of blocks acknowledged since the last call."""
        with self._lock:
            acked, self.acked = self.acked or [], []
        return acked

    def wait_for_acks(self) -> None:
        """Wait (beating) up to ``WAKE_S`` for a block to be acknowledged, or the block list."""
        if self.listing is not None:
            self._release(block=True)
        else:
            self._collect(block=True, timeout=WAKE_S)
        self.on_wait()

    def list_existing(self) -> None:
        """Start asking which blocks storage already holds for this blob.

        Uncommitted and committed both: a commit lists each ID as "latest",
        which storage looks up in the uncommitted list first, then in the
        committed one. The request runs on the network thread (``submit``),
        so a slow or hung endpoint never holds the copy back.
        """
        assert self.submit_request is not None
        self.listing = self.submit_request(self._existing_blocks)

    def _existing_blocks(self) -> dict[str, int]:
        try:
            committed, uncommitted = self.blob.get_block_list("all")
        except ResourceNotFoundError:  # no blob yet: no block either
            return {}
        return {block.id: block.size for block in (*committed, *uncommitted)}

    def _release(self, block: bool) -> None:
        """Once the block list is known, send (or skip) the blocks held for it."""
        if self.listing is None:
            return
        while block and not self.listing.done():
            wait([self.listing], timeout=WAKE_S)
            if not self.listing.done():
                self.on_wait()
        if not self.listing.done():
            return
        listing, self.listing = self.listing, None
        self.existing = listing.result()  # raises the request's error
        self.on_listed()
        held, self.held = self.held, []
        for ident, offset, length, md5 in held:
            self._send(ident, offset, length, md5)

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
        ident = block_id(md5, len(self.block_ids))
        self.block_ids.append(ident)
        self._release(block=False)
        if self.listing is not None:
            self.held.append((ident, offset, length, md5))
            return
        self._send(ident, offset, length, md5)

    def _send(self, ident: str, offset: int, length: int, md5: bytes) -> None:
        if self.existing.get(ident) == length:
            with self._lock:
                self.uploaded += length
                self.skipped += length
                if self.acked is not None:
                    self.acked.append((offset, length))
            return
        while len(self.pending) >= MAX_BLOCKS_AHEAD:
            self._wait_for_room()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        if self.started is None:
            self.started = time.monotonic()
            _ = self.blob  # made here, before any block thread needs it
        self.pending.add(self.pool.submit(self._put, ident, offset, length, md5))

    def _put(self, ident: str, offset: int, length: int, md5: bytes) -> None:
        assert self._fd is not None
        body = FileRange(self._fd, offset, length, self._sending, self.bucket, self.file_calls)
        # The SDK reads any file-like object; its stub says IO[bytes].
        self.blob.stage_block(
            ident,
            body,  # type: ignore[arg-type]
            length=length,
            transactional_content_md5=bytearray(md5),
        )
        with self._lock:
            self.uploaded += length
            done = self.uploaded
            if self.acked is not None:
                self.acked.append((offset, length))
        self.progress(done, self.total)

    def _sending(self) -> None:
        """A block is going out (or waiting for its budget): beat (the channel keeps
        this to one per 0.25 s), so a slow link with large blocks shows progress."""
        self.progress(self.uploaded, self.total)

    def _wait_for_room(self) -> None:
        """The copy is ``MAX_BLOCKS_AHEAD`` blocks ahead: wait (beating) for one to finish."""
        self._collect(block=True, timeout=WAKE_S)
        self.on_wait()

    def _collect(self, block: bool, timeout: float | None = None) -> None:
        if not self.pending:
            return
        finished, self.pending = wait(
            self.pending, timeout=timeout if block else 0, return_when=FIRST_COMPLETED
        )
        for future in finished:
            future.result()  # raises the block's error

    def wait_for_blocks(self, size: int) -> None:
        """Wait (beating every ``WAKE_S``) until every block added is in storage."""
        self.total = size
        self._release(block=True)
        if self.started is None:
            self.started = time.monotonic()
        while self.pending:
            self._collect(block=True, timeout=WAKE_S)
            self.on_wait()

    def commit(
        self,
        size: int,
        md5: bytes | None,
        metadata: dict[str, str] | None = None,
        unchanged_since: Version | None = None,
    ) -> None:
        """Wait for every block, then commit them, with the whole file's MD5 if known.

        The tier and the metadata go in the commit itself: a blob that exists
        has them, with no window where a second call has not happened yet.
        With ``unchanged_since`` (see :func:`blob_version`) the commit happens
        only if the blob is still as it was then.
        """
        self.wait_for_blocks(size)
        settings = ContentSettings(content_md5=bytearray(md5)) if md5 is not None else None
        self.run(
            lambda: self.blob.commit_block_list(
                # The SDK takes block IDs as strings too; its stub says list[BlobBlock].
                self.block_ids,  # type: ignore[arg-type]
                content_settings=settings,
                metadata=metadata,
                standard_blob_tier=self.tier,
                **_condition(unchanged_since),
            )
        )

    def close(self) -> None:
        """Cancel what has not started, wait (beating) for what has, release the file."""
        self.held = []
        for future in self.pending:
            future.cancel()
        while self.pending:  # no block thread may outlive the descriptor
            _, self.pending = wait(self.pending, timeout=WAKE_S)
            if self.pending:
                self.on_wait()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


Version = tuple[str | None]
"""A blob's ETag when it was looked at, or ``(None,)`` when there was no blob."""
NO_BLOB: Version = (None,)


def blob_version(client: ContainerClient, blob_name: str) -> Version:
    """What the blob is now, so that a commit can require it unchanged.

    Two replicas may upload one claimed file at once (the recovery of one
    takes a file the other is still uploading). The one that read the file
    earlier must not replace what the other committed from a newer read:
    the uploader looks at the blob, checks that the NFS file is still the
    version it read, and commits only if the blob did not change in between.
    """
    try:
        return (client.get_blob_client(blob_name).get_blob_properties().etag,)
    except ResourceNotFoundError:
        return NO_BLOB


def _condition(version: Version | None) -> dict[str, Any]:
    if version is None:
        return {}
    if version[0] is None:
        return {"match_condition": MatchConditions.IfMissing}  # If-None-Match: *
    return {"etag": version[0], "match_condition": MatchConditions.IfNotModified}


def condition_failed(exc: BaseException) -> bool:
    """A conditional commit was refused: the blob is not what the condition said.

    For a commit conditional on an ETag, another upload committed the blob
    since it was looked at; for one conditional on no blob (:data:`NO_BLOB`),
    there is a blob of that name.
    """
    return (
        isinstance(exc, HttpResponseError)
        and exc.status_code in (409, 412)
        and error_code(exc) in ("ConditionNotMet", "BlobAlreadyExists")
    )


def put_whole(
    put_blob: PutBlob,
    blob_name: str,
    path: str,
    staged: Staged,
    tier: StandardBlobTier | None = None,
    metadata: dict[str, str] | None = None,
    unchanged_since: Version | None = None,
) -> None:
    """One Put Blob request: the file's bytes (kept by staging, else read), MD5-checked,
    with the tier and metadata set in the same request.

    The MD5 computed while staging is both the request's Content-MD5 (storage
    rejects the request if the bytes differ) and the blob's stored MD5; the
    SDK's ``validate_content`` would hash the file a second time for the same
    header. Sent by :class:`~ingestd.putblob.PutBlob`, not the SDK (why: see there).
    """
    data = staged.data
    assert staged.md5 is not None, "staging always hashes a file that goes in one request"
    if data is None:
        with open(path, "rb") as stream:
            data = stream.read()
    headers = {f"x-ms-meta-{key}": value for key, value in (metadata or {}).items()}
    if tier is not None:
        headers["x-ms-access-tier"] = str(tier.value)
    if unchanged_since is not None:
        etag = unchanged_since[0]
        headers.update({"If-None-Match": "*"} if etag is None else {"If-Match": etag})
    put_blob.put(blob_name, data, staged.md5, headers)
