"""Provenance metadata: what every blob says about where it came from.

Set on the blob in the same request that commits it (never a second call),
so a blob that exists always carries it. Keys are valid C# identifiers
under an ``ingestd_`` prefix (Azure's rule for metadata names). Values must be
ASCII to travel as HTTP headers: every text value is percent-encoded UTF-8
(``urllib.parse.quote`` with no safe characters, the same encoding as the
session folder in the blob name), so ``urllib.parse.unquote`` gives the
original back exactly, spaces, ``%`` and non-ASCII included.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from urllib.parse import quote

from ingestd import __version__
from ingestd.messages import Job

PREFIX = "ingestd_"
NAME = PREFIX + "name"
SESSION = PREFIX + "session"
DATE = PREFIX + "date"
SIZE = PREFIX + "size"
MTIME = PREFIX + "mtime"
HOST = PREFIX + "host"
VERSION = PREFIX + "version"
MD5 = PREFIX + "md5"


def encode(text: str) -> str:
    """ASCII-safe, reversible: percent-encode every byte outside ``A-Za-z0-9_.-~``.

    The file name goes through ``os.fsencode`` so a name that is not valid
    UTF-8 on the share (held by Python as surrogate escapes) is encoded as
    its original bytes instead of failing.
    """
    return quote(os.fsencode(text), safe="")


def host_name() -> str:
    """The pod's name: ``HOSTNAME`` (Kubernetes sets it to the pod name), else the host's."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def format_mtime(mtime_ns: int) -> str:
    """RFC 3339 UTC with all nine digits: exact, and readable without a converter."""
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


def blob_metadata(
    job: Job, size: int, mtime_ns: int | None, md5: bytes | None, host: str
) -> dict[str, str]:
    """The metadata for ``job``'s blob.

    ``job.session`` is already the percent-encoded session (the blob's folder),
    so it is stored as it is and decodes the same way as every other value.
    The MD5 (hex) is there only when it was computed for the whole file.
    """
    metadata = {
        NAME: encode(job.name),
        SESSION: job.session,
        DATE: job.date,
        SIZE: str(size),
        HOST: encode(host),
        VERSION: encode(__version__),
    }
    if mtime_ns is not None:
        metadata[MTIME] = format_mtime(mtime_ns)
    if md5 is not None:
        metadata[MD5] = md5.hex()
    return metadata
