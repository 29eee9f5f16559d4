"""The alert rules and the dashboard name only metrics the service exports.

``promtool`` is not available here, so the rule file's structure is checked
by hand, and every ``ingestd_*`` metric in every expression is looked up in a
live scrape of the real service.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

MONITORING = Path(__file__).resolve().parents[1] / "manifests" / "monitoring"
METRIC = re.compile(r"\bingestd_[a-z0-9_]+\b")
DURATION = re.compile(r"^\d+[smhdw]$")


def exported_names(make_service) -> set[str]:
    service = make_service()
    text = service.http.get("/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def rule_exprs() -> list[dict]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    assert list(document) == ["groups"]
    rules = []
    for group in document["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["name"]
        rules.extend(group["rules"])
    return rules


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"]
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def autoscaling_texts() -> list[str]:
    """The autoscaling examples (manifests/autoscaling/): queries and metric names."""
    return [path.read_text() for path in sorted((MONITORING.parent / "autoscaling").glob("*.yaml"))]


@pytest.mark.timeout(10)
def test_alert_rules_are_well_formed() -> None:
    rules = rule_exprs()
    assert len(rules) >= 5
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    for wanted in (
        "IngestdNoUploadsWhileFilesWait",
        "IngestdStuckChildren",
        "IngestdUploadErrorRate",
    ):
        assert wanted in names


@pytest.mark.timeout(60)
def test_every_metric_named_by_alerts_dashboard_and_autoscalers_is_exported(make_service) -> None:
    exported = exported_names(make_service)
    referenced = set()
    for expr in [r["expr"] for r in rule_exprs()] + dashboard_exprs() + autoscaling_texts():
        referenced.update(METRIC.findall(expr))
    assert referenced, "no metric referenced"
    missing = sorted(referenced - exported)
    assert not missing, f"named but not exported: {missing}"
