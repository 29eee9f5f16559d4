"""A loopback TCP proxy in front of Azurite that a test controls: blob endpoint faults.

Why a proxy and not Azurite itself: stopping or SIGSTOPping Azurite loses its
in-memory blobs or freezes every client at once, and a persistent Azurite is
not crash-safe (field notes). Breaking the network path instead keeps the
store intact while ingestd sees exactly what a failing endpoint looks like.

Modes (``BlobProxy.mode``; switch with :meth:`BlobProxy.set_mode` or the
named helpers):

``pass``
    Forward bytes both ways unchanged.
``refuse``
    Nothing listens on the port: connects get ECONNREFUSED and live
    connections are reset (RST). The listener is ``shutdown(SHUT_RDWR)``
    before ``close()``: ``close()`` alone leaves the thread blocked in
    ``accept()`` holding the port, and re-listening on it fails with
    EADDRINUSE. Leaving ``refuse`` listens again on the same port.
``blackhole``
    Connections are accepted and whatever the client sends is read and
    dropped; nothing is ever answered. Live connections go black too (a
    request in flight hangs). Leaving ``blackhole`` resets every connection
    that was black, since its HTTP stream is no longer consistent.
``corrupt_auth``
    Forward, but alter one character of every ``Authorization: SharedKey
    <account>:<signature>`` header, keeping its length: storage answers 403
    AuthorizationFailure, like revoked credentials.

Counters (:meth:`BlobProxy.counts`): bytes client->server (``up``) and
server->client (``down``), connections accepted, and requests (HTTP request
lines seen client->server; a body that happens to contain `` HTTP/1.1\\r\\n``
would count too, which random data makes vanishingly rare). Totals since
start, and since the last :meth:`BlobProxy.reset_counts`.

Rates (:meth:`BlobProxy.sample`): the bandwidth cap must be measured at the
storage side, finer than whole blocks (Azurite shows a staged block only once
all of it is in). Sampling records the running ``up`` total ten times a
second, so any window's rate can be read off afterwards (:func:`rate`,
:func:`transfer_span`).

Only 127.0.0.1 is ever bound or connected to.

Example::

    with BlobProxy(azurite.port) as proxy:
        client = ContainerClient(proxy.account_url(azurite.account_name), ...)
        proxy.refuse()       # uploads now fail with connection refused
        proxy.pass_through() # and work again
        print(proxy.counts())
"""

from __future__ import annotations

import bisect
import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass

from tests.support import devstore

LOOPBACK = "127.0.0.1"
MODES = ("pass", "refuse", "blackhole", "corrupt_auth")
AUTH_PREFIX = b"Authorization: SharedKey "
REQUEST_MARK = b" HTTP/1.1\r\n"
RECV_SIZE = 64 * 1024
REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.1\r\n")
LINE_TAIL = 4096
"""Bytes of a connection's upstream stream kept between reads, so that a request
line split across two reads is still seen whole (and only once)."""
SAMPLE_S = 0.1


@dataclass(frozen=True)
class Counts:
    """Traffic through the proxy; ``*_total`` since start, the others since the last reset."""

    up: int
    down: int
    requests: int
    connections: int
    up_total: int
    down_total: int
    requests_total: int
    connections_total: int


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER (on, 0): the peer gets a RST, not an orderly FIN.

    ``shutdown(SHUT_RD)`` first wakes a pump thread blocked in ``recv()`` on
    this socket (on Linux it sends nothing): until that ``recv`` returns, the
    kernel holds the socket and ``close()`` alone would send no RST at all.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def corrupt_signature(line: bytes) -> bytes:
    """One ``Authorization: SharedKey acct:sig`` line with one signature character changed.

    The length stays the same, so only the signature check can reject it.
    """
    colon = line.index(b":", len(AUTH_PREFIX))
    position = colon + 1
    old = line[position : position + 1]
    new = b"B" if old == b"A" else b"A"
    return line[:position] + new + line[position + 1 :]


def _partial_suffix(data: bytes, pattern: bytes) -> int:
    """Length of the longest tail of ``data`` that is a proper prefix of ``pattern``."""
    for length in range(min(len(pattern) - 1, len(data)), 0, -1):
        if data.endswith(pattern[:length]):
            return length
    return 0


class _Connection:
    """One client connection and, unless black, its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.black = upstream is None
        self.auth_buffer = b""
        self.mark_tail = b""
        self.line_tail = b""

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class BlobProxy:
    """A threaded loopback proxy to ``127.0.0.1:upstream_port``; see the module docstring."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream = (LOOPBACK, upstream_port)
        self._requested_port = port
        self.port = 0
        self._mode = "pass"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._counts = dict.fromkeys(("up", "down", "requests", "connections"), 0)
        self._totals = dict(self._counts)
        self._request_lines: list[tuple[str, str]] = []
        self._running = False
        self._samples: list[tuple[float, int]] = []
        self._sampling = threading.Event()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> BlobProxy:
        self._running = True
        self._listen()
        return self

    def stop(self) -> None:
        """Stop listening and reset every connection; idempotent."""
        self._running = False
        self._sampling.clear()
        self._close_listener()
        self._reset_all(lambda conn: True)

    def __enter__(self) -> BlobProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def account_url(self, account: str) -> str:
        """Path-style account URL through the proxy, as Azurite wants it."""
        return f"{self.url}/{account}"

    def service_env(self, account: str = devstore.ACCOUNT_NAME) -> dict[str, str]:
        """ingestd settings that send every blob request (startup check too) through here."""
        endpoint = self.account_url(account)
        return {
            "APP_AZURE_ACCOUNT_URL": endpoint,
            "APP_AZURE_CONNECTION_STRING": devstore.connection_string(endpoint),
        }

    # ------------------------------------------------------------------- modes
    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch mode; see the module docstring for what each does to live connections."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; known: {MODES}")
        with self._lock:
            previous, self._mode = self._mode, mode
        if mode == "refuse":
            self._close_listener()
            self._reset_all(lambda conn: True)
            return
        if previous == "blackhole":
            self._reset_all(lambda conn: conn.black)
        if mode == "blackhole":
            with self._lock:
                for conn in self._connections:
                    conn.black = True
        if self._listener is None and self._running:
            self._listen()

    def pass_through(self) -> None:
        self.set_mode("pass")

    def refuse(self) -> None:
        self.set_mode("refuse")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def corrupt_auth(self) -> None:
        self.set_mode("corrupt_auth")

    # ---------------------------------------------------------------- counters
    def counts(self) -> Counts:
        with self._lock:
            return Counts(**self._counts, **{f"{k}_total": v for k, v in self._totals.items()})

    def requests_seen(self) -> list[tuple[str, str]]:
        """Every request line forwarded so far, as ``(method, path with query)``.

        What storage was asked to do, counted where it is asked: e.g. the
        Put Blob and Put Block List requests per blob name tell how many
        times each blob was committed, whoever sent them.
        """
        with self._lock:
            return list(self._request_lines)

    def reset_counts(self) -> Counts:
        """Zero the resettable counters; returns what they were."""
        with self._lock:
            before = Counts(**self._counts, **{f"{k}_total": v for k, v in self._totals.items()})
            self._counts = dict.fromkeys(self._counts, 0)
        return before

    @property
    def sent(self) -> int:
        """Bytes client->server since start."""
        with self._lock:
            return self._totals["up"]

    def sample(self, interval: float = SAMPLE_S) -> None:
        """Record ``(monotonic time, bytes sent so far)`` every ``interval`` until stopped."""
        self._sampling.set()

        def run() -> None:
            while self._sampling.is_set():
                with self._lock:
                    self._samples.append((time.monotonic(), self._totals["up"]))
                time.sleep(interval)

        threading.Thread(target=run, name="proxy-sampler", daemon=True).start()

    def samples(self) -> list[tuple[float, int]]:
        with self._lock:
            return list(self._samples)

    def live_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _count(self, name: str, amount: int) -> None:
        with self._lock:
            self._counts[name] += amount
            self._totals[name] += amount

    # --------------------------------------------------------------- listening
    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port or self._requested_port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop,
            args=(listener,),
            name=f"proxy-accept-{self.port}",
            daemon=True,
        )
        self._accept_thread.start()

    def _close_listener(self) -> None:
        """shutdown() first: it wakes the thread blocked in accept(), which frees the port."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._count("connections", 1)
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        upstream = None
        if self._mode != "blackhole":
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                return
        conn = _Connection(client, upstream)
        with self._lock:
            self._connections.add(conn)
        threading.Thread(target=self._pump_up, args=(conn,), daemon=True, name="proxy-up").start()
        if upstream is not None:
            threading.Thread(
                target=self._pump_down, args=(conn,), daemon=True, name="proxy-down"
            ).start()

    def _reset_all(self, which) -> None:
        with self._lock:
            doomed = [conn for conn in self._connections if which(conn)]
            for conn in doomed:
                self._connections.discard(conn)
        for conn in doomed:
            conn.reset()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    # ------------------------------------------------------------------ pumps
    def _pump_up(self, conn: _Connection) -> None:
        """Client -> server; drops the bytes while the connection is black."""
        try:
            while data := conn.client.recv(RECV_SIZE):
                self._count("up", len(data))
                self._count_requests(conn, data)
                if conn.black or conn.upstream is None:
                    continue
                if self._mode == "corrupt_auth" or conn.auth_buffer:
                    data = self._corrupt(conn, data)
                conn.upstream.sendall(data)
            if conn.upstream is not None and not conn.black:
                conn.upstream.shutdown(socket.SHUT_WR)
        except OSError:
            conn.reset()
            self._forget(conn)

    def _pump_down(self, conn: _Connection) -> None:
        """Server -> client; a black connection never answers."""
        assert conn.upstream is not None
        try:
            while data := conn.upstream.recv(RECV_SIZE):
                if conn.black:
                    continue
                self._count("down", len(data))
                conn.client.sendall(data)
            if not conn.black:
                conn.client.shutdown(socket.SHUT_WR)
                conn.client.close()
                conn.upstream.close()
                self._forget(conn)
        except OSError:
            conn.reset()
            self._forget(conn)

    def _count_requests(self, conn: _Connection, data: bytes) -> None:
        window = conn.mark_tail + data
        self._count("requests", window.count(REQUEST_MARK))
        conn.mark_tail = window[-(len(REQUEST_MARK) - 1) :]
        lines = conn.line_tail + data
        seen = [
            (m.group(1).decode(), m.group(2).decode("latin-1"))
            for m in REQUEST_LINE.finditer(lines)
            if m.end() > len(conn.line_tail)
        ]
        conn.line_tail = lines[-LINE_TAIL:]
        if seen:
            with self._lock:
                self._request_lines.extend(seen)

    def _corrupt(self, conn: _Connection, data: bytes) -> bytes:
        """What may be sent now, with every complete SharedKey line altered.

        A header split across reads is held back (only as much of the tail as
        could still be the start of it), never any other byte.
        """
        buffer = conn.auth_buffer + data
        out = bytearray()
        while True:
            start = buffer.find(AUTH_PREFIX)
            if start < 0:
                keep = _partial_suffix(buffer, AUTH_PREFIX)
                out += buffer[: len(buffer) - keep]
                conn.auth_buffer = buffer[len(buffer) - keep :]
                return bytes(out)
            end = buffer.find(b"\r\n", start)
            if end < 0:
                out += buffer[:start]
                conn.auth_buffer = buffer[start:]
                return bytes(out)
            out += buffer[:start] + corrupt_signature(buffer[start:end])
            buffer = buffer[end:]


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
    """Bytes per second sent over ``[start, start + seconds]``."""
    return (bytes_at(samples, start + seconds) - bytes_at(samples, start)) / seconds


def transfer_span(
    samples: list[tuple[float, int]], baseline: int, threshold: int = 1_000_000
) -> tuple[float, float]:
    """When the upload got going (``threshold`` bytes past ``baseline``, the count
    before it began: startup checks go through the proxy too) and when the last
    byte went through."""
    first = next(t for t, b in samples if b > baseline + threshold)
    total = samples[-1][1]
    last = next(t for t, b in samples if b >= total)
    return first, last
