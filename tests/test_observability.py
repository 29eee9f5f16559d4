"""Metrics, JSON logs and secrets: what an operator paged at night relies on.

Each test drives the real service and reads what it exposes: the /metrics
exposition (parsed with prometheus_client's own parser), the log stream
(every line parsed as JSON), and both searched for secrets.
"""

from __future__ import annotations

import json

import pytest

from tests.support.azurite import Azurite
from tests.support.service import Layout, scrape, write_random

MiB = 1024 * 1024


@pytest.mark.timeout(90)
def test_metrics_move_by_the_right_amounts(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    service = make_service()
    before = scrape(service)
    assert before["ingestd_files_uploaded_total{}"] == 0
    assert before["ingestd_info{auth_method=connection string,version=0.1.0}"] == 1
    assert before["ingestd_healthy{}"] == 1
    assert before["ingestd_child_heartbeat_age_seconds{child=uploader-1,role=uploader}"] < 5

    session = service.start_session("metrics")
    sizes = [3 * MiB, 5 * MiB, 1000]
    md5s = {
        f"m{i}.bin": write_random(layout.incoming / f"m{i}.bin", size)
        for i, size in enumerate(sizes)
    }
    service.wait_processed(len(sizes), timeout=60)
    for name, md5 in md5s.items():
        assert (
            azurite.blob_md5(azurite_container, f"{session['date_prefix']}/metrics/{name}") == md5
        )

    after = scrape(service)
    assert after["ingestd_files_uploaded_total{}"] == len(sizes)
    assert after["ingestd_bytes_uploaded_total{}"] == sum(sizes)
    assert after["ingestd_upload_duration_seconds_count{}"] == len(sizes)
    assert after["ingestd_file_size_bytes_count{}"] == len(sizes)
    assert after["ingestd_file_size_bytes_sum{}"] == sum(sizes)
    small = [
        v
        for k, v in after.items()
        if k.startswith("ingestd_file_size_bytes_bucket{le=")
        and float(k.split("le=")[1].rstrip("}")) == MiB
    ]
    assert small == [1], "exactly one file is at most 1 MiB"
    assert after["ingestd_upload_failures_total{}"] == 0
    assert after["ingestd_files_in_flight{}"] == 0
    assert after["ingestd_files_queued{}"] == 0
    assert after["ingestd_scans_total{}"] > before["ingestd_scans_total{}"]
    assert after["ingestd_scan_duration_seconds_count{}"] >= 1
    assert after["ingestd_last_success_timestamp_seconds{}"] > 0
    assert after["ingestd_watch_enabled{}"] == 1
    assert after["ingestd_child_restarts_total{role=uploader}"] == 0

    per_session = {(s["date"], s["session"]): s for s in service.status()["sessions"]}
    counters = per_session[(session["date_prefix"], "metrics")]
    assert counters["files_done"] == len(sizes)
    assert counters["bytes_done"] == sum(sizes)
    assert counters["in_flight"] == 0 and counters["queued"] == 0


@pytest.mark.timeout(90)
def test_json_logs_parse_line_by_line_and_carry_the_file_context(
    make_service, layout: Layout
) -> None:
    service = make_service(APP_LOG_FORMAT="json")
    session = service.start_session("json logs")
    write_random(layout.incoming / "j1.bin", 2 * MiB)
    write_random(layout.incoming / "j2.bin", 1 * MiB)
    service.wait_processed(2, timeout=60)
    service.stop()

    events = [json.loads(line) for line in service.log_text().splitlines() if line.strip()]
    assert events, "no log lines"
    successes = [e for e in events if e.get("message", "").startswith("uploaded ")]
    assert {e["file"] for e in successes} == {"j1.bin", "j2.bin"}
    for event in successes:
        assert event["session"] == "json%20logs"
        assert event["date"] == session["date_prefix"]
        assert event["role"].startswith("uploader-")
        assert isinstance(event["pid"], int)
        assert event["size"] in (2 * MiB, 1 * MiB)
        assert event["seconds"] >= 0 and "mb_per_s" in event
        assert event["level"] == "INFO"
    started = [e for e in events if e.get("message") == "session started"]
    assert started and started[0]["session"] == "json%20logs"
    roles = {e["role"] for e in events}
    assert "api" in roles and any(r.startswith("uploader-") for r in roles), roles


@pytest.mark.timeout(90)
def test_no_secret_in_any_log_line_or_metric(
    make_service, layout: Layout, azurite: Azurite
) -> None:
    """Fallback keys configured (and a wrong key first, so errors are logged too)."""
    service = make_service(
        APP_AZURE_ACCOUNT_NAME="devstoreaccount1",
        APP_AZURE_ACCOUNT_KEY=azurite.account_key,
        APP_LOG_LEVEL="DEBUG",
    )
    service.start_session("secrets")
    write_random(layout.incoming / "s.bin", 1 * MiB)
    service.wait_processed(1, timeout=60)
    exposition = service.http.get("/metrics").text
    status = service.http.get("/v1/status").text
    service.stop()
    logs = service.log_text()
    assert "uploaded" in logs
    for secret in (azurite.account_key, azurite.connection_string):
        for text in (logs, exposition, status):
            assert secret not in text
