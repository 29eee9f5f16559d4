"""The invariant, checked once the schedule has drained and every service has stopped.

"Every byte that reaches incoming ends up in Blob Storage or stays on NFS."
For each finished version ``v`` of a file named ``N`` (see writers.Version):

1. **late bytes**: bytes of ``v`` written after ingestd had unlinked the
   file (``st_nlink == 0`` after the write). On NFS such writes fail (ESTALE);
   they are counted, not checked, and ``v`` below means the bytes written
   while the file was still linked (a prefix of what the writer wrote). So a
   writer that appends after the claim is checked for every byte that landed
   before the cleanup unlinked the file: fix 1's loss is a violation, an
   append after the unlink is not.
2. **kept**: ``v``'s MD5 equals the downloaded bytes of a blob
   ``<date>/<encoded session>/N`` under any session, or of a file named ``N``
   still on NFS: in incoming, in ``.processing/<date>/<session>/``, or in
   ``.failed/<date>/<session>/`` (as ``N`` or ``N.k``) with its reason sidecar
   ``.failed/<date>/<session>/.errors/<that name>`` naming ``N``.
3. **superseded**: ``v`` is not the latest version of ``N``, a later version
   ``w`` of ``N`` is kept, and either the writer of a later version swapped
   ``v``'s own inode out of incoming (the writer discarded it before ingestd
   took it; known exactly through renameat2 RENAME_EXCHANGE), or ``w`` is kept
   as a blob (same name, so same blob when in the same session: overwrite is
   the designed behaviour).
4. Anything else is a **violation** ("lost"). In particular the latest
   version of every name must be kept.

Also:

* **session**: every blob ``<date>/<S>/N`` has ``S`` a session the campaign
  started, and some version of ``N`` appeared in incoming before ``S`` stopped
  being active (``created_s < end of S``): nothing is uploaded under a
  session it was not found in. A blob of a name no writer wrote is a violation.
* **processes**: no process of any service tree is left (``Service.survivors``).
* **log lines**: lines of the service logs that mention a file name are
  counted per name; more than ``LOG_LINES_PER_FILE`` is an endless retry.
  The bound is generous on purpose (about 4 lines per attempt, restarts and
  faults replay some): a healthy file logs 1-3 lines, a looping one hundreds.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tests.campaign.writers import Version
from tests.support.azurite import Azurite
from tests.support.service import md5_of

LOG_LINES_PER_FILE = 150


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    kept_blob: int = 0
    kept_nfs: int = 0
    superseded: int = 0
    late: int = 0
    blobs: int = 0


def blob_contents(azurite: Azurite, container: str) -> dict[str, str]:
    """Blob name -> MD5 of its downloaded bytes (what landed, not what was claimed)."""
    return {name: azurite.blob_md5(container, name) for name in azurite.blob_names(container)}


def nfs_contents(backing: Path) -> dict[str, set[str]]:
    """File name -> MD5s of its copies still on NFS (incoming, .processing, .failed + sidecar)."""
    found: dict[str, set[str]] = defaultdict(set)
    incoming = backing / "incoming"
    for path in incoming.iterdir():
        if path.is_file() and not path.name.startswith("."):
            found[path.name].add(md5_of(path))
    for path in (backing / ".processing").glob("*/*/*"):
        if path.is_file() and not path.name.startswith("."):
            found[path.name].add(md5_of(path))
    for path in (backing / ".failed").glob("*/*/*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        sidecar = path.parent / ".errors" / path.name
        try:
            name = json.loads(sidecar.read_text())["name"]
        except (OSError, ValueError, KeyError):
            continue  # quarantined without its reason: not "kept"
        found[name].add(md5_of(path))
    return found


def check_versions(
    versions: list[Version], blobs: dict[str, str], nfs: dict[str, set[str]], findings: Findings
) -> None:
    in_blobs: dict[str, set[str]] = defaultdict(set)
    for blob, md5 in blobs.items():
        in_blobs[blob.rsplit("/", 1)[-1]].add(md5)
    by_name: dict[str, list[Version]] = defaultdict(list)
    for version in versions:
        by_name[version.name].append(version)
    for name, history in by_name.items():
        history.sort(key=lambda v: v.finished_s)
        for position, version in enumerate(history):
            later = history[position + 1 :]
            if version.late_bytes:
                findings.late += 1
            if version.md5 in in_blobs[name]:
                findings.kept_blob += 1
            elif version.md5 in nfs[name]:
                findings.kept_nfs += 1
            elif _superseded(version, later, in_blobs[name], nfs[name]):
                findings.superseded += 1
            else:
                findings.violations.append(_lost(version, later, in_blobs[name], nfs[name]))


def _superseded(
    version: Version, later: list[Version], in_blobs: set[str], on_nfs: set[str]
) -> bool:
    kept_later = [w for w in later if (w.md5 in in_blobs or w.md5 in on_nfs)]
    if not kept_later:
        return False
    return version.replaced_in_incoming or any(w.md5 in in_blobs for w in kept_later)


def _lost(version: Version, later: list[Version], in_blobs: set[str], on_nfs: set[str]) -> str:
    def held(md5s: set[str]) -> list[str]:
        return sorted(version.stages.get(m, m[:12]) for m in md5s)

    return (
        f"LOST {version.name} (writer {version.writer}, {version.kind}, {version.size} "
        f"bytes written while linked, {version.late_bytes} late, md5 {version.md5[:12]}, "
        f"finished at {version.finished_s:.1f} s, "
        f"{len(later)} later version(s)): not in any blob of that name (blobs hold "
        f"{held(in_blobs)}) nor on NFS ({held(on_nfs)})"
    )


def check_sessions(
    blobs: dict[str, str],
    versions: list[Version],
    sessions: dict[str, list[float]],
    findings: Findings,
) -> None:
    encoded = {quote(name, safe=""): name for name in sessions}
    created: dict[str, list[float]] = defaultdict(list)
    for version in versions:
        created[version.name].append(version.created_s)
    for blob in blobs:
        parts = blob.split("/")
        if len(parts) != 3 or parts[1] not in encoded:
            findings.violations.append(f"blob {blob!r} is under no session the campaign started")
            continue
        name = parts[2]
        if name not in created:
            findings.violations.append(f"blob {blob!r}: no writer wrote a file of that name")
            continue
        end = sessions[encoded[parts[1]]][1]
        if not any(when < end for when in created[name]):
            findings.violations.append(
                f"blob {blob!r}: session {encoded[parts[1]]!r} ended at {end:.1f} s, before "
                f"any version of {name} appeared (first at {min(created[name]):.1f} s)"
            )


def check_log_lines(logs: list[Path], names: set[str], findings: Findings) -> Counter[str]:
    counts: Counter[str] = Counter()
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            for name in names:
                if name in line:
                    counts[name] += 1
    for name, count in counts.items():
        if count > LOG_LINES_PER_FILE:
            findings.violations.append(
                f"{name}: {count} log lines (bound {LOG_LINES_PER_FILE}): endless retry?"
            )
    return counts
