"""Logging for the parent and every child: one stream, one format, no secrets.

Children inherit the parent's stderr, so configuring each process with the
same handler puts every line on the same stream, tagged with its ``role``
and ``pid``. Context (``file``, ``session``, ``date``) is passed as ``extra``
and rendered as fields in both formats.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("role", "file", "session", "date", "size", "seconds", "mb_per_s", "error")
REDACTED = "***"


class _RoleFilter(logging.Filter):
    """Stamps every record with the process role (api, scanner, uploader-2)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "role"):
            record.role = self.role
        return True


class SecretRedactor(logging.Filter):
    """Replaces any configured secret value in a record before it is written.

    The code never logs a secret on purpose; this catches the accidents
    (an SDK exception that echoes a connection string, a repr of a client).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redact(formatted)
            record.exc_info = None
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


_CONTROLS = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROLS.update(
    {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"}
)
_ESCAPES = {**_CONTROLS, ord("\\"): "\\\\"}


def escape(text: str) -> str:
    """``text`` with every control character (and backslash) written as an escape.

    File names, session names and error text come from outside: a name with
    a newline in it must not start a line of its own that reads like a log
    record. Backslashes are doubled so that an escape in the output always
    means a control character in the value.
    """
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``time level role[pid] message key=value ...`` for humans at a terminal.

    One record is one line: the message (format string and arguments alike)
    is escaped, context fields are written as ``repr``; only a traceback
    spans lines, and each of its lines is indented, so no line of the output
    can pass for the start of a record unless it is one.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(role)s[%(process)d] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_text and not record.exc_info and not getattr(record, "_indented", False):
            record.exc_text = _indent(record.exc_text)  # formatted by the redactor
            record._indented = True
        line = super().format(record)
        fields = [
            f"{name}={getattr(record, name)!r}"
            for name in CONTEXT_FIELDS[1:]
            if getattr(record, name, None) is not None
        ]
        return " ".join([line, *fields]) if fields else line


def _indent(text: str) -> str:
    """Every line of a traceback, including lines inside its exception message, indented.

    Lines are split the way a reader of the stream splits them (``\\n``,
    ``\\r``), not by ``str.splitlines``, which also breaks on characters no
    terminal treats as a line end.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(f"    {line.translate(_CONTROLS)}" for line in lines)


def _json_formatter() -> logging.Formatter:
    formatter = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(role)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "asctime": "time", "process": "pid"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )
    formatter.converter = time.gmtime  # one clock for every pod: UTC
    return formatter


def configure(fmt: str, level: str, role: str, secrets: Iterable[str] = ()) -> None:
    """Send this process's logs to stderr in ``fmt`` (json or text).

    Called once in the parent and once at the start of every child.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RoleFilter(role))
    handler.addFilter(SecretRedactor(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The SDK logs every request at INFO, with headers; only its warnings help.
    logging.getLogger("azure").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
