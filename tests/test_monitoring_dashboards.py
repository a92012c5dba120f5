"""Structural checks of the Grafana dashboards and provisioning files.

Grafana is not packaged for Debian 12, so these checks stand in for loading the
dashboards: the fields a current Grafana needs, a unit and the datasource
variable on every panel, and recording rules that exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
DASHBOARD_FILES = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# A recording rule name has two colons: level:metric:operations.
RULE_NAME = re.compile(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b")
# Raw metric names a panel may read without a recording rule.
RAW_METRIC = re.compile(r"\b(tiled_[a-z_]+|node_[a-z_]+|haproxy_[a-z_]+|up)\b")


def load_dashboards() -> list[dict]:
    return [json.loads(path.read_text()) for path in DASHBOARD_FILES]


def recorded_names() -> set[str]:
    data = yaml.safe_load((MONITORING / "rules" / "recording.yml").read_text())
    return {rule["record"] for group in data["groups"] for rule in group["rules"]}


def exported_metric_names() -> set[str]:
    """Return the sample names the tiled daemon exports, from tiled.metrics."""
    from tiled import metrics

    names = set()
    for metric in metrics.ALL_METRICS:
        for family in metric.collect():
            names.update(sample.name for sample in family.samples)
            names.add(family.name)
    return names


def panel_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [
        (panel, target) for panel in dashboard["panels"] for target in panel["targets"]
    ]


def test_dashboards_exist():
    names = {path.name for path in DASHBOARD_FILES}
    assert names == {"tiled-overview.json", "tiled-node.json"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_dashboard_top_level_fields(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert isinstance(dashboard["templating"]["list"], list)
    assert dashboard["panels"]


def test_dashboard_uids_unique():
    uids = [dashboard["uid"] for dashboard in load_dashboards()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_dashboard_variables(path):
    dashboard = json.loads(path.read_text())
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "job" in variables
    assert "instance" in variables or "host" in variables
    for name, variable in variables.items():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, name


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_panels_structure(path):
    dashboard = json.loads(path.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel id"
    for panel in dashboard["panels"]:
        title = panel["title"]
        assert panel["type"] in ("timeseries", "stat"), title
        assert panel["datasource"] == DATASOURCE, title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, title
        assert grid["x"] + grid["w"] <= 24, title
        assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_panels_do_not_overlap(path):
    dashboard = json.loads(path.read_text())
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


def test_panel_rules_exist():
    recorded = recorded_names()
    for dashboard in load_dashboards():
        for panel, target in panel_targets(dashboard):
            for name in RULE_NAME.findall(target["expr"]):
                assert name in recorded, f"{panel['title']}: no rule {name}"


def test_panel_raw_metrics_exported():
    exported = exported_metric_names()
    for dashboard in load_dashboards():
        for panel, target in panel_targets(dashboard):
            expr = RULE_NAME.sub("", target["expr"])
            for name in RAW_METRIC.findall(expr):
                if name.startswith("tiled_"):
                    assert name in exported, f"{panel['title']}: {name} not exported"


def test_panels_leave_rates_to_rules():
    # Rates and quantiles belong in recording rules, so that every panel is
    # cheap to draw over long ranges. Panels may read raw gauges.
    computed = re.compile(r"\b(rate|irate|increase|histogram_quantile)\(")
    for dashboard in load_dashboards():
        for panel, target in panel_targets(dashboard):
            assert not computed.search(target["expr"]), panel["title"]


def test_alert_rules_exist():
    recorded = recorded_names()
    data = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            for name in RULE_NAME.findall(rule["expr"]):
                assert name in recorded, f"{rule['alert']}: no rule {name}"


def test_grafana_provisioning_files():
    provisioning = MONITORING / "grafana" / "provisioning"
    datasources = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text()
    )
    assert datasources["apiVersion"] == 1
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "tiled.yml").read_text())
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["type"] == "file"
    assert providers["providers"][0]["options"]["path"]
