"""One seed from start to verdict: plan, play, drain, stop, check, summarise."""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.campaign import check
from tests.campaign.rig import CONTAINER, Rig, rig, visible_files
from tests.campaign.schedule import FAULT_KINDS, Plan, make_plan
from tests.campaign.writers import Ledger, Writers

DRAIN_TIMEOUT_S = 90.0
LASTING = {"freeze", "eio", "refuse", "blackhole", "staging_full"}


@dataclass
class Result:
    seed: int
    plan: Plan
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    files: int = 0
    versions: int = 0
    bytes_written: int = 0
    late: int = 0
    kept_blob: int = 0
    kept_nfs: int = 0
    superseded: int = 0
    blobs: int = 0
    left_on_nfs: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        """The summary every run prints."""
        rows = [
            ("seed", str(self.seed)),
            (
                "replicas / staging",
                f"{self.plan.replicas} / {'small tmpfs' if self.plan.small_staging else 'folder'}",
            ),
            ("run time", f"{self.seconds:.0f} s"),
            *((f"fault {kind}", str(self.faults.get(kind, 0))) for kind in FAULT_KINDS),
            ("files (names)", str(self.files)),
            ("versions finished", str(self.versions)),
            ("bytes written", f"{self.bytes_written:,}"),
            ("kept as blob", str(self.kept_blob)),
            ("kept on NFS", str(self.kept_nfs)),
            ("superseded by a later version", str(self.superseded)),
            ("versions with late writes (after unlink)", str(self.late)),
            ("blobs", str(self.blobs)),
            ("files left on NFS", str(len(self.left_on_nfs))),
            ("findings (not violations)", str(len(self.findings))),
            ("VIOLATIONS", str(len(self.violations))),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  left on NFS: {p}" for p in self.left_on_nfs]
        lines += [f"  finding: {f}" for f in self.findings]
        lines += [f"  VIOLATION: {v}" for v in self.violations]
        return "\n".join(lines)


def session_name(seed: int, number: int) -> str:
    """Names that need encoding (space, slash), so blob prefixes test the encoding too."""
    return f"campaign {seed}" if number == 0 else f"campaign {seed}/{number}"


def run_seed(
    seed: int,
    duration_s: float = 25.0,
    writers: int = 30,
    big: bool = False,
    append_writers: int = 2,
    keep: bool = False,
    log=print,
) -> Result:
    plan = make_plan(seed, duration_s, writers, big, append_writers)
    log(f"=== campaign seed {seed} ===")
    log(plan.describe())
    workdir = Path(tempfile.mkdtemp(prefix=f"campaign-{seed}-", dir="/tmp"))
    result = Result(seed, plan, workdir=workdir)
    started = time.monotonic()
    try:
        with rig(workdir, plan.replicas, plan.small_staging, plan.settings) as parts:
            _play(plan, parts, result, log)
    except Exception:
        result.violations.append("campaign run failed:\n" + traceback.format_exc())
    result.seconds = time.monotonic() - started
    log(result.table())
    if result.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"  logs and NFS folders kept in {workdir}")
    return result


def _play(plan: Plan, parts: Rig, result: Result, log) -> None:
    session = session_name(plan.seed, 0)
    for replica in parts.replicas:
        replica.start(session)
    parts.t0 = time.monotonic()
    parts.sessions[session] = [0.0, float("inf")]
    parts.session = session
    ledger = Ledger()
    writers = Writers(parts.incoming(), parts.backing / ".processing", ledger, parts.now)
    for at_s, action in _timeline(plan, parts, writers):
        time.sleep(max(0.0, at_s - parts.now()))
        action()
    parts.clear()
    still = writers.join(180)
    if still:
        result.violations.append(f"writers never finished: {still}")
    _drain(parts, result, log)
    parts.stop_all()
    _judge(parts, ledger, result)


def _timeline(plan: Plan, parts: Rig, writers: Writers) -> list[tuple[float, object]]:
    """Every planned action as (time, callable), in time order (stable for equal times)."""
    events: list[tuple[float, int, object]] = []
    for writer in plan.writers:
        events.append((writer.at_s, len(events), lambda w=writer: writers.launch(w)))
    for fault in plan.faults:
        events.append(
            (fault.at_s, len(events), lambda f=fault: parts.apply(f.kind, f.pick, f.replica))
        )
        if fault.kind in LASTING:
            events.append((fault.at_s + fault.duration_s, len(events), parts.clear))
    for number, at_s in enumerate(plan.session_switches, start=1):
        events.append(
            (at_s, len(events), lambda n=number: parts.start_session(session_name(plan.seed, n)))
        )
    events.sort(key=lambda e: (e[0], e[1]))
    return [(at_s, action) for at_s, _, action in events]


def _drain(parts: Rig, result: Result, log) -> None:
    """Faults are cleared: let the service finish what it can, restarting nothing by hand."""
    for replica in parts.replicas:
        parts.ensure_running(replica, why="had exited by itself before the drain")
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        quiet = quiet + 1 if parts.idle() else 0
        time.sleep(0.5)
    if quiet < 3:
        parts.findings.append(f"not drained after {DRAIN_TIMEOUT_S:.0f} s")
    log(f"  drained at {parts.now():.1f} s")


def _judge(parts: Rig, ledger: Ledger, result: Result) -> None:
    result.faults = parts.faults
    result.findings = parts.findings
    survivors = parts.survivors()
    if survivors:
        result.violations.append(f"processes left behind: {survivors}")
    for error in ledger.errors:
        result.violations.append(f"harness writer error: {error}")
    blobs = check.blob_contents(parts.azurite, CONTAINER)
    nfs = check.nfs_contents(parts.backing)
    findings = check.Findings()
    check.check_versions(ledger.versions, blobs, nfs, findings)
    check.check_sessions(blobs, ledger.versions, parts.sessions, findings)
    logs = [s.log_path for r in parts.replicas for s in r.services]
    check.check_log_lines(logs, {v.name for v in ledger.versions}, findings)
    result.violations += findings.violations
    result.files = len({v.name for v in ledger.versions})
    result.versions = len(ledger.versions)
    result.bytes_written = ledger.bytes_written
    result.late = findings.late
    result.kept_blob = findings.kept_blob
    result.kept_nfs = findings.kept_nfs
    result.superseded = findings.superseded
    result.blobs = len(blobs)
    backing = parts.backing
    result.left_on_nfs = [
        str(p.relative_to(backing))
        for folder in ("incoming", ".processing", ".failed")
        for p in visible_files(backing / folder)
    ]
