"""The checks end-to-end tests end with: what arrived, what was left, what /metrics says.

One strict version of each, shared by every test file: every expected file
is a blob whose *downloaded* bytes match, and no file at all (bookkeeping
records included) is left in incoming, ``.processing`` or staging.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:  # service.py imports this module: no import of it at run time
    from tests.support.azurite import Azurite
    from tests.support.service import Layout


def assert_all_arrived(
    azurite: Azurite, container: str, prefix: str, expected: dict[str, str]
) -> None:
    """Every expected file is a blob under ``prefix`` and its downloaded bytes match.

    ``expected`` maps file name -> MD5 of what was written.
    """
    names = set(azurite.blob_names(container, prefix=prefix))
    missing = {prefix + name for name in expected} - names
    assert not missing, f"missing blobs: {sorted(missing)}"
    wrong = [
        name for name, md5 in expected.items() if azurite.blob_md5(container, prefix + name) != md5
    ]
    assert not wrong, f"blobs whose bytes differ from the source: {wrong}"


LEASES = ".leases"
"""``.processing/.leases``: each running replica's lease (ingestd.leases) stays there
while it runs, by design; it is no leftover. Owner links (``.owner``) are checked."""


def _is_lease(label: str, relative: Path) -> bool:
    return label == "processing" and relative.parts[0] == LEASES


def leftovers(layout: Layout) -> dict[str, list[str]]:
    """Files still in incoming, ``.processing`` (bookkeeping included) or staging."""
    found = {}
    for label, folder in (
        ("incoming", layout.incoming),
        ("processing", layout.processing),
        ("staging", layout.staging),
    ):
        if folder.exists():
            found[label] = sorted(
                str(p.relative_to(folder))
                for p in folder.rglob("*")
                if not p.is_dir() and not _is_lease(label, p.relative_to(folder))
            )
        else:
            found[label] = []
    return found


def assert_nothing_left(layout: Layout) -> None:
    """Incoming, ``.processing`` (even ``.attempts`` records) and staging hold no file."""
    left = leftovers(layout)
    assert left == {"incoming": [], "processing": [], "staging": []}, left


def failed_files(layout: Layout) -> list[Path]:
    """Quarantined files (not their sidecars)."""
    return layout.files_under(layout.failed)


def sidecar(layout: Layout, date: str, session: str, name: str) -> dict[str, Any]:
    """The error record quarantine wrote next to ``name``."""
    path = layout.failed / date / session / ".errors" / name
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def samples(text: str) -> dict[str, float]:
    """Every sample of Prometheus text as ``name{k=v,...}`` -> value (``name{}`` unlabelled).

    Parsed by prometheus_client's own parser, so a malformed exposition fails here.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus text (unlabelled unless ``labels`` are given)."""
    key = f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"
    found = samples(text)
    if key not in found:
        raise AssertionError(f"metric {key} not found")
    return found[key]
