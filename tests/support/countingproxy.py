"""A loopback TCP proxy in front of Azurite that counts the bytes it hands to it.

Why: the bandwidth cap must be measured at the storage side, at a finer grain
than whole blocks. Azurite shows a staged block only once all its bytes are
in (16 MiB at a time here, sixteen blocks in flight), far too coarse for a
5 s window. The proxy counts every request byte as it is written to
Azurite's socket, and a sampler records the running total ten times a
second, so any window's rate can be read off afterwards.

Threads, ``recv``/``sendall``; 127.0.0.1 only. ``stop()`` shuts the listener
down (``shutdown`` before ``close``, so no thread stays in ``accept``) and
resets live connections.
"""

from __future__ import annotations

import bisect
import socket
import struct
import threading
import time

LOOPBACK = "127.0.0.1"
CHUNK = 256 * 1024
SAMPLE_S = 0.1


class CountingProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target_port>, counting upstream bytes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sent = 0
        self._samples: list[tuple[float, int]] = []
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        for thread in self._threads:
            thread.start()

    def endpoint(self, account: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{account}"

    # Reading the counts

    @property
    def sent(self) -> int:
        with self._lock:
            return self._sent

    def samples(self) -> list[tuple[float, int]]:
        """``(monotonic time, bytes handed to Azurite so far)``, every 0.1 s."""
        with self._lock:
            return list(self._samples)

    # The proxy

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(CHUNK):
                sink.sendall(data)
                if count:
                    with self._lock:
                        self._sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _sample(self) -> None:
        while not self._stopping.wait(SAMPLE_S):
            with self._lock:
                self._samples.append((time.monotonic(), self._sent))

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass


def bytes_at(samples: list[tuple[float, int]], when: float) -> float:
    """The running total at ``when``, interpolated between the two samples around it."""
    times = [t for t, _ in samples]
    i = bisect.bisect_left(times, when)
    if i == 0:
        return float(samples[0][1])
    if i >= len(samples):
        return float(samples[-1][1])
    (t0, b0), (t1, b1) = samples[i - 1], samples[i]
    return b0 + (b1 - b0) * (when - t0) / (t1 - t0)


def rate(samples: list[tuple[float, int]], start: float, seconds: float) -> float:
    """Bytes per second handed to Azurite over ``[start, start + seconds]``."""
    return (bytes_at(samples, start + seconds) - bytes_at(samples, start)) / seconds


def transfer_span(samples: list[tuple[float, int]], baseline: int,
                  threshold: int = 1_000_000) -> tuple[float, float]:
    """When the upload got going (``threshold`` bytes past ``baseline``, the count
    before it began: startup checks go through the proxy too) and when the last
    byte went through."""
    first = next(t for t, b in samples if b > baseline + threshold)
    total = samples[-1][1]
    last = next(t for t, b in samples if b >= total)
    return first, last
