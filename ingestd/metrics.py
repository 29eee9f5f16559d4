"""Prometheus metrics, built in the parent from what the children report.

Children never touch a metric: they send messages, the supervisor updates
:class:`~ingestd.stats.Stats`, and a scrape renders that state. So there is no
multiprocess mode, no shared files, and nothing a killed child can corrupt.
Histograms are observed as results arrive (:class:`Metrics` is the
supervisor's :class:`~ingestd.status.Observer`); everything else is read at
scrape time from a :class:`~ingestd.status.Snapshot`, which the supervisor
takes under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ingestd import __version__
from ingestd.messages import Stage
from ingestd.status import Snapshot, health, storage_view

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MiB = 1024 * 1024


class Metrics:
    """The registry for one service, and the histograms the supervisor feeds.

    It is the supervisor's :class:`~ingestd.status.Observer`; :meth:`attach`
    gives it the snapshots the other families are read from.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.upload_seconds = Histogram(
            "ingestd_upload_duration_seconds",
            "Time from claim to cleanup of each uploaded file.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.file_bytes = Histogram(
            "ingestd_file_size_bytes",
            "Size of each uploaded file.",
            buckets=tuple(MiB * b for b in (1, 10, 100, 256, 512, 1024, 4096, 16384)),
            registry=self.registry,
        )
        self.scan_seconds = Histogram(
            "ingestd_scan_duration_seconds",
            "Time one poll of the incoming folder took.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )

    def scanned(self, seconds: float) -> None:
        self.scan_seconds.observe(seconds)

    def uploaded(self, seconds: float, size: int) -> None:
        self.upload_seconds.observe(seconds)
        self.file_bytes.observe(size)

    def attach(self, snapshot: Callable[[], Snapshot]) -> None:
        """Read the other families from ``snapshot()`` (``Supervisor.snapshot``) at each scrape."""
        self.registry.register(_StateCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Counters and gauges read from the supervisor's state at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # families vary with the children present; skip the up-front check

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield _info(snap)
        yield from _counters(snap)
        yield from _gauges(snap)
        yield from _children(snap)


def _info(snap: Snapshot) -> InfoMetricFamily:
    info = InfoMetricFamily("ingestd", "Version and the Azure auth method in use.")
    info.add_metric([], {"version": __version__, "auth_method": snap.auth_method})
    return info


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _counters(snap: Snapshot) -> Iterator[Metric]:
    stats = snap.stats
    yield _counter("ingestd_files_uploaded", "Files uploaded and cleaned up.", stats.processed_ok)
    yield _counter("ingestd_bytes_uploaded", "Bytes of files uploaded.", stats.bytes_ok)
    yield _counter(
        "ingestd_upload_failures",
        "Failed attempts (the file is retried).",
        stats.processed_err - stats.quarantined - sum(stats.gave_up.values()),
    )
    yield _counter(
        "ingestd_files_quarantined",
        "Files moved to .failed after too many attempts.",
        stats.quarantined,
    )
    yield _counter(
        "ingestd_files_skipped",
        "Files skipped at the claim: another replica took them, "
        "or they changed since found stable.",
        stats.skipped,
    )
    yield _counter(
        "ingestd_files_interrupted", "Files whose uploader died or was killed.", stats.interrupted
    )
    yield _counter(
        "ingestd_files_recovered", "Files found in .processing at startup.", stats.recovered_total
    )
    yield _counter("ingestd_scan_errors", "Polls that failed with an NFS error.", stats.scan_errors)
    yield _counter("ingestd_scans", "Polls of the incoming folder.", stats.scans)
    gave_up = CounterMetricFamily(
        "ingestd_files_given_up",
        "Files with no more tries in this run, by the step that kept failing (claim: "
        "stays in incoming; cleanup, quarantine: stays in .processing).",
        labels=["stage"],
    )
    for stage in (Stage.CLAIM, Stage.CLEANUP, Stage.QUARANTINE):
        gave_up.add_metric([stage], stats.gave_up.get(stage, 0))
    yield gave_up
    restarts = CounterMetricFamily(
        "ingestd_child_restarts", "Children replaced, by role.", labels=["role"]
    )
    kills = CounterMetricFamily(
        "ingestd_child_kills", "Children killed for a stale heartbeat.", labels=["role"]
    )
    for role in ("scanner", "uploader"):
        restarts.add_metric([role], stats.restarts.get(role, 0))
        kills.add_metric([role], stats.kills.get(role, 0))
    yield restarts
    yield kills


def _gauges(snap: Snapshot) -> Iterator[Metric]:
    stats = snap.stats
    yield GaugeMetricFamily(
        "ingestd_files_in_flight", "Files being uploaded now.", value=len(snap.flights)
    )
    yield GaugeMetricFamily(
        "ingestd_files_queued", "Files waiting for an uploader.", value=snap.queue.depth
    )
    yield GaugeMetricFamily(
        "ingestd_scan_files_seen",
        "Candidate files seen by the last poll.",
        value=stats.last_scan_seen,
    )
    yield GaugeMetricFamily(
        "ingestd_backlog_files",
        "Stable files waiting in incoming at the last poll (0 while "
        "not watching). Every replica sees the same folder: "
        "aggregate with max(), not sum().",
        value=stats.backlog_files,
    )
    yield GaugeMetricFamily(
        "ingestd_backlog_bytes",
        "Bytes of the stable files waiting in incoming at the last poll.",
        value=stats.backlog_bytes,
    )
    yield GaugeMetricFamily(
        "ingestd_watch_enabled", "1 while a session is scanning.", value=1 if snap.enabled else 0
    )
    yield GaugeMetricFamily(
        "ingestd_last_success_timestamp_seconds",
        "Unix time of the last successful upload (0: none yet).",
        value=stats.last_success_at or 0,
    )
    yield GaugeMetricFamily(
        "ingestd_healthy", "1 when /healthz would answer 200.", value=1 if health(snap)[0] else 0
    )
    yield GaugeMetricFamily(
        "ingestd_folders_usable",
        "0 while the startup check finds the folders unusable (incoming, "
        ".processing and .failed on different filesystems, or staging "
        "not writable): no file is claimed then.",
        value=0 if snap.setup_problems else 1,
    )
    yield GaugeMetricFamily(
        "ingestd_upload_rate_cap_bytes_per_second",
        "The pod's upload rate cap now (0: no cap).",
        value=snap.rate.cap,
    )
    storage = storage_view(snap)
    yield GaugeMetricFamily(
        "ingestd_storage_reachable",
        "0 while the blob endpoint does not answer (refused, timing out, "
        "5xx, throttled); 1 otherwise. Liveness stays green meanwhile.",
        value=1 if storage["reachable"] else 0,
    )
    yield GaugeMetricFamily(
        "ingestd_storage_auth_failing",
        "1 while storage rejects the credential (401/403, or no token); "
        "the service exits with code 3 after APP_AUTH_FAILURE_EXIT_S.",
        value=1 if storage["state"] == "auth_failing" else 0,
    )
    yield GaugeMetricFamily(
        "ingestd_storage_problem_seconds",
        "Seconds the current storage problem has lasted (0: none).",
        value=storage["for_s"] or 0,
    )
    staging = snap.staging
    yield GaugeMetricFamily(
        "ingestd_staging_budget_bytes",
        "Staging bytes all uploaders share (APP_STAGING_BUDGET, else the "
        "staging filesystem's size; 0: not known, no budget kept).",
        value=staging.budget_bytes,
    )
    yield GaugeMetricFamily(
        "ingestd_staging_reserved_bytes",
        "Staging bytes reserved by files in flight (whole files, or windows).",
        value=staging.reserved_bytes,
    )
    yield GaugeMetricFamily(
        "ingestd_files_windowed_in_flight",
        "Files in flight staged through a window (too large to stage whole).",
        value=len(staging.windowed_in_flight),
    )
    yield GaugeMetricFamily(
        "ingestd_files_waiting_for_staging",
        "1 while a file waits for its staging reservation to fit.",
        value=1 if staging.waiting_for_space else 0,
    )
    yield _counter(
        "ingestd_files_windowed",
        "Files uploaded through a staging window.",
        staging.windowed_total,
    )


def _children(snap: Snapshot) -> Iterator[Metric]:
    stuck = GaugeMetricFamily(
        "ingestd_stuck_children",
        "Killed children the kernel has not released, by role.",
        labels=["role"],
    )
    for role in ("scanner", "uploader"):
        stuck.add_metric([role], snap.stuck.get(role, 0))
    yield stuck
    age = GaugeMetricFamily(
        "ingestd_child_heartbeat_age_seconds",
        "Seconds since each child slot last reported.",
        labels=["child", "role"],
    )
    for slot in snap.slots:
        age.add_metric([slot.role, slot.kind], round(slot.beat_age, 3))
    yield age
