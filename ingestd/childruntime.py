"""What every child process does first, and its end of the pipe.

Runs inside every child (scanner and uploaders), never in the parent; the
parent's handle on a child is ``childhandle``.

A child owns one duplex pipe to the parent. It must die with the parent (an
orphaned uploader would keep claiming files nobody counts), must not send
two messages at once from two threads (the SDK calls the progress hook from
its block-upload threads), and should not flood the parent with beats.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from ingestd import logs
from ingestd.config import Settings
from ingestd.messages import Beat, ChildState

M = TypeVar("M")

_PR_SET_PDEATHSIG = 1
BEAT_INTERVAL_S = 0.25
"""Beats closer together than this carry no news, only load."""


class ParentGone(Exception):
    """The parent closed its end of the pipe: time to exit."""


class FileCalls:
    """File syscalls in progress on side threads (block threads reading staging).

    The work loop's own syscalls need no tracking: a work loop stuck in one
    stops beating. A block thread stuck in ``pread`` on a frozen disk does
    not stop the work loop, which keeps beating while it waits for the
    blocks; so each beat carries the age of the oldest call in here, and the
    supervisor kills the child once that age passes the stall timeout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self._tokens = itertools.count()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        token = next(self._tokens)
        with self._lock:
            self._started[token] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                del self._started[token]

    def oldest_age(self, now: float) -> float:
        with self._lock:
            return now - min(self._started.values()) if self._started else 0.0


class Channel:
    """The child's end of its pipe, safe to use from several threads.

    A child may register handlers for control messages (:meth:`on`): those
    are read off the pipe and applied whenever the child beats, so they take
    effect within a beat even while the main loop is busy with a job. Every
    other message waits in an inbox for :meth:`poll` / :meth:`recv`.
    Without handlers the channel behaves exactly as a plain pipe.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._last_beat = 0.0
        self._last: tuple[ChildState, str | None, int, int] = (ChildState.STARTING, None, 0, 0)
        self._handlers: dict[type, Callable[[Any], None]] = {}
        self._inbox: deque[object] = deque()
        self._waiting = ""
        self.file_calls = FileCalls()

    def on(self, kind: type[M], handler: Callable[[M], None]) -> None:
        """Apply messages of type ``kind`` as soon as they are read, wherever that is."""
        self._handlers[kind] = handler

    def send(self, message: object) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise ParentGone() from exc

    def beat(
        self,
        state: ChildState,
        file: str | None = None,
        done: int = 0,
        total: int = 0,
        force: bool = False,
    ) -> None:
        """Report liveness, at most every ``BEAT_INTERVAL_S`` unless ``force``."""
        now = time.monotonic()
        self._last = (state, file, done, total)
        if not force and now - self._last_beat < BEAT_INTERVAL_S:
            return
        self._last_beat = now
        self.send(
            Beat(
                state=state,
                file=file,
                bytes_done=done,
                bytes_total=total,
                waiting=self._waiting,
                syscall_age=round(self.file_calls.oldest_age(now), 3),
            )
        )
        if self._handlers:
            with self._lock:
                self._pump()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """While inside, every beat says the work loop waits on ``what`` (``"network"``)."""
        previous, self._waiting = self._waiting, what
        try:
            yield
        finally:
            self._waiting = previous

    def renew(self) -> None:
        """Beat again with what the last beat said (rate-limited like any beat).

        For a work loop that is waiting on its own other threads (which are
        making progress), not on a syscall: it is still doing what it said.
        """
        self.beat(*self._last)

    def poll(self, timeout: float) -> bool:
        with self._lock:
            self._pump()
            if self._inbox:
                return True
        try:
            ready = self._conn.poll(timeout)
        except (EOFError, OSError) as exc:
            raise ParentGone() from exc
        if not ready or not self._handlers:
            return ready
        with self._lock:
            self._pump()
            return bool(self._inbox)

    def recv(self) -> object:
        with self._lock:
            self._pump()
            if self._inbox:
                return self._inbox.popleft()
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ParentGone() from exc

    def _pump(self) -> None:
        """Read whatever is waiting (lock held): apply control messages, keep the rest."""
        if not self._handlers:
            return
        try:
            while self._conn.poll(0):
                message = self._conn.recv()
                handler = self._handlers.get(type(message))
                if handler is None:
                    self._inbox.append(message)
                else:
                    handler(message)
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
