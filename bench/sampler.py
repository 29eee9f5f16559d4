"""CPU and memory of a process tree, read from /proc through psutil.

* CPU: user + system seconds of every process of the tree, read at the start
  and at the end of the timed section (processes that start meanwhile count
  from zero; the contenders' processes live through the whole section).
* Peak RSS, two ways: the largest sum of RSS over the tree seen by a sampler
  (every 50 ms), and the sum of each process's own peak (VmHWM, reset at the
  start of the section by writing 5 to /proc/PID/clear_refs). The second is
  exact per process and an upper bound for the tree (peaks need not
  coincide); the report uses it when the reset worked.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

MiB = 1024 * 1024

WATCHED: dict[str, int] = {}
"""Other processes whose CPU each section also reports (the bench puts Azurite here),
to show where the machine's time goes."""


def _reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rchar(pid: int | None) -> int | None:
    """Bytes the process has read through read()/recv() so far (/proc/PID/io).

    For the in-memory Azurite that is, to within headers, the request bodies
    it received: the same progress measure for every contender.
    """
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/io") as handle:
            for line in handle:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class TreeUsage:
    cpu_s: float = 0.0
    peak_rss_sampled: int = 0
    peak_rss_hwm_sum: int | None = None
    per_process_peak: dict[str, int] = field(default_factory=dict)
    per_process_cpu: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (t, rss sum)
    watched_cpu_s: dict[str, float] = field(default_factory=dict)
    received: list[tuple[float, int]] = field(default_factory=list)  # (t, bytes Azurite read)
    machine_busy: float = 0.0  # share of all cores busy (any process), 0..1
    machine_iowait: float = 0.0

    @property
    def peak_rss(self) -> int:
        return self.peak_rss_hwm_sum or self.peak_rss_sampled


class TreeSampler:
    """``start()`` at the start of the timed section, ``stop()`` at its end."""

    def __init__(
        self, root_pid: int | list[int], interval: float = 0.05, refresh_s: float = 0.5
    ) -> None:
        pids = root_pid if isinstance(root_pid, list) else [root_pid]
        self.roots = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.refresh_s = refresh_s
        self.procs: dict[int, psutil.Process] = {}
        self.cpu_start: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.usage = TreeUsage()
        self.reset_ok = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._t0 = 0.0
        self._names: dict[int, str] = {}

    def _refresh(self) -> None:
        found = []
        for root in self.roots:
            try:
                found += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
        for proc in found:
            if proc.pid not in self.procs:
                self.procs[proc.pid] = proc
                self.reset_ok &= _reset_peak(proc.pid)
                try:
                    self._names[proc.pid] = " ".join(proc.cmdline()[-2:])[-60:]
                except psutil.Error:
                    self._names[proc.pid] = str(proc.pid)
                if self._t0:  # born during the section: counts from zero
                    self.cpu_start.setdefault(proc.pid, 0.0)

    def _cpu(self, proc: psutil.Process) -> float | None:
        try:
            times = proc.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return None

    def start(self) -> TreeSampler:
        self._watched = {}
        for name, pid in WATCHED.items():
            try:
                self._watched[name] = psutil.Process(pid)
            except psutil.Error:
                continue
        self._watched_start = {n: self._cpu(p) or 0.0 for n, p in self._watched.items()}
        self._machine_start = psutil.cpu_times()
        self._refresh()
        for pid, proc in self.procs.items():
            cpu = self._cpu(proc)
            if cpu is not None:
                self.cpu_start[pid] = cpu
                self.cpu_last[pid] = cpu
            _reset_peak(pid)
        self._rchar0 = _rchar(WATCHED.get("azurite"))
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        last_refresh = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last_refresh >= self.refresh_s:
                self._refresh()
                last_refresh = now
            self._sample(now)

    def _sample(self, now: float) -> None:
        total = 0
        for pid, proc in list(self.procs.items()):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
            cpu = self._cpu(proc)
            if cpu is not None:
                self.cpu_last[pid] = cpu
        self.usage.samples.append((now - self._t0, total))
        rchar = _rchar(WATCHED.get("azurite"))
        if rchar is not None and self._rchar0 is not None:
            self.usage.received.append((now - self._t0, rchar - self._rchar0))
        self.usage.peak_rss_sampled = max(self.usage.peak_rss_sampled, total)

    def stop(self) -> TreeUsage:
        """End the section; read CPU and peaks now (before any process exits)."""
        self._stop.set()
        self._thread.join()
        self._sample(time.monotonic())
        hwm_total = 0
        for pid in self.procs:
            hwm = _hwm_bytes(pid)
            if hwm is None:
                continue
            hwm_total += hwm
            self.usage.per_process_peak[f"{pid} {self._names.get(pid, '')}"] = hwm
        if self.reset_ok and hwm_total:
            self.usage.peak_rss_hwm_sum = hwm_total
        for name, proc in self._watched.items():
            self.usage.watched_cpu_s[name] = (self._cpu(proc) or 0.0) - self._watched_start[name]
        end = psutil.cpu_times()
        total = sum(end) - sum(self._machine_start)
        if total > 0:
            self.usage.machine_busy = (
                1
                - (end.idle - self._machine_start.idle + end.iowait - self._machine_start.iowait)
                / total
            )
            self.usage.machine_iowait = (end.iowait - self._machine_start.iowait) / total
        self.usage.per_process_cpu = {
            f"{pid} {self._names.get(pid, '')}": round(
                self.cpu_last[pid] - self.cpu_start.get(pid, 0.0), 3
            )
            for pid in self.cpu_last
        }
        self.usage.cpu_s = sum(
            self.cpu_last[pid] - self.cpu_start.get(pid, 0.0) for pid in self.cpu_last
        )
        return self.usage
