"""The parent's handle on one child process and its private pipe.

Runs in the parent only (the supervisor spawns, feeds, kills and reaps its
children through it); what runs inside the child is ``childruntime``.

Nothing here ever waits: liveness is read with ``waitpid(WNOHANG)`` (what
``Process.exitcode`` does), and a kill is a signal, not a join. The pipe is
created for this child alone and thrown away with it, because a child killed
mid-write could leave a shared channel corrupt.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

_context = multiprocessing.get_context("spawn")
"""``spawn``, not ``fork``: the parent runs threads (uvicorn, the supervisor)
and a forked child would inherit their locks in whatever state they were."""


class ChildProcess:
    """A started child with its end of a duplex pipe."""

    def __init__(self, role: str, target: Callable[..., None], args: tuple[object, ...]) -> None:
        parent_end, child_end = _context.Pipe(duplex=True)
        self.role = role
        self.process = _context.Process(
            target=target, args=(child_end, *args), name=f"ingestd-{role}", daemon=False
        )
        self.process.start()
        child_end.close()  # only the child may hold it, so its death reads as EOF here
        self.conn: Connection | None = parent_end
        self.started = time.monotonic()
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def exited(self) -> bool:
        """Has the child exited and been reaped? Never blocks (WNOHANG)."""
        return self.process.exitcode is not None

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def send(self, message: object) -> bool:
        """Send a small message; False if the child is gone.

        Messages are tiny and each child gets at most one job at a time, so
        the pipe buffer never fills and this does not block.
        """
        if self.conn is None:
            return False
        try:
            self.conn.send(message)
            return True
        except (BrokenPipeError, EOFError, OSError):
            self.close_pipe()
            return False

    def close_pipe(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def kill(self) -> None:
        """SIGKILL: the only signal that ends a wait on a hard NFS mount."""
        self.close_pipe()
        if self.killed_at is None:
            self.killed_at = time.monotonic()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def release(self) -> None:
        """Free the Process object once reaped."""
        self.close_pipe()
        try:
            self.process.close()
        except ValueError:
            pass  # still running; only called after exited(), so rare
