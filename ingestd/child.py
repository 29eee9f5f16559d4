"""What every child process does first, and its end of the pipe.

A child owns one duplex pipe to the parent. It must die with the parent (an
orphaned uploader would keep claiming files nobody counts), must not send
two messages at once from two threads (the SDK calls the progress hook from
its block-upload threads), and should not flood the parent with beats.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection

from ingestd import logs
from ingestd.config import Settings
from ingestd.messages import Beat

_PR_SET_PDEATHSIG = 1
BEAT_INTERVAL_S = 0.25
"""Beats closer together than this carry no news, only load."""


class ParentGone(Exception):
    """The parent closed its end of the pipe: time to exit."""


class Channel:
    """The child's end of its pipe, safe to use from several threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._last_beat = 0.0

    def send(self, message: object) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise ParentGone() from exc

    def beat(self, state: str, file: str | None = None, done: int = 0, total: int = 0,
             force: bool = False) -> None:
        """Report liveness, at most every ``BEAT_INTERVAL_S`` unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_INTERVAL_S:
            return
        self._last_beat = now
        self.send(Beat(state=state, file=file, bytes_done=done, bytes_total=total))

    def poll(self, timeout: float) -> bool:
        try:
            return self._conn.poll(timeout)
        except (EOFError, OSError) as exc:
            raise ParentGone() from exc

    def recv(self) -> object:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ParentGone() from exc


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the parent dies (Linux only).

    A ``kill -9`` of the parent alone must not leave uploaders running.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def start(settings: Settings, role: str) -> None:
    """Common start of a child: die with the parent, log like the parent.

    SIGINT and SIGHUP are ignored so that Ctrl-C or a closed terminal, which
    signal the whole process group, reach only the parent, which then drains
    and stops the children in order; SIGTERM keeps its default.
    """
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure(settings.log_format, settings.log_level, role, settings.secrets())
    logging.getLogger(__name__).debug("child started", extra={"role": role})
