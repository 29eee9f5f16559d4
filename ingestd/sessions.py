"""Session names, their folder-safe encoding and the date prefix.

A session decides where a file lands: ``<date>/<encoded_session>/<filename>``
in the container, and the same two folders under ``.processing`` and staging.
The date is taken once, when the session starts, so a long session that
crosses midnight keeps one prefix and a restart derives it from the path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from urllib.parse import quote, unquote

import uuid6

MAX_ENCODED_BYTES = 255
"""A folder name on NFS and ext4 is at most 255 bytes."""


class SessionNameError(ValueError):
    """The requested name cannot be used as a folder."""


@dataclass(frozen=True)
class Session:
    """One ingestion run: a name and the UTC date it started on."""

    name: str
    encoded: str
    date: str

    @property
    def blob_prefix(self) -> str:
        return f"{self.date}/{self.encoded}/"


def encode_session(name: str) -> str:
    """Percent-encode ``name`` with no safe characters.

    ``quote(name, safe="")`` turns ``/`` into ``%2F``, so the result is always
    one path component; only ``.`` and ``..`` stay dangerous, and are refused.
    """
    try:
        encoded = quote(name, safe="")
    except UnicodeEncodeError:  # lone surrogates: legal in JSON, not a UTF-8 folder name
        raise SessionNameError(f"session name {name!r} is not valid Unicode text") from None
    if encoded in (".", ".."):
        raise SessionNameError(f"session name {name!r} is not allowed: it names a folder itself")
    if len(encoded.encode()) > MAX_ENCODED_BYTES:
        raise SessionNameError(
            f"session name is too long: {len(encoded.encode())} bytes once encoded, "
            f"at most {MAX_ENCODED_BYTES}"
        )
    return encoded


def decode_session(encoded: str) -> str:
    """The original name of an encoded session folder."""
    return unquote(encoded)


def generated_name() -> str:
    """``00-session-<UUIDv7>``: UUIDv7 starts with the time, so names sort by age."""
    return f"00-session-{uuid6.uuid7()}"


def date_prefix(now: dt.datetime | None = None) -> str:
    """Today's UTC date as ``YYYYMMDD``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(dt.UTC).strftime("%Y%m%d")


def new_session(name: str | None, now: dt.datetime | None = None) -> Session:
    """A session for ``name``, or a generated one if it is missing or blank."""
    if name is None or not name.strip():
        name = generated_name()
    return Session(name=name, encoded=encode_session(name), date=date_prefix(now))
