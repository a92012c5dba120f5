"""Static checks of the Prometheus configuration, rules and their unit tests."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tiled.metrics import LATENCY_BUCKETS

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = sorted((MONITORING / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((ROOT / "tests" / "monitoring").glob("*.test.yml"))

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not installed (Debian package prometheus)"
)


def load_generator():
    """Import monitoring/generate.py, which is a script and not a package."""
    spec = importlib.util.spec_from_file_location(
        "monitoring_generate", MONITORING / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generator()


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@needs_promtool
def test_prometheus_config_valid():
    result = run_promtool("check", "config", str(MONITORING / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rule_files_valid():
    result = run_promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass():
    assert PROMTOOL_TESTS, "no promtool test files in tests/monitoring"
    result = run_promtool("test", "rules", *map(str, PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_files_current():
    stale = generate.stale_files(generate.load_thresholds())
    names = [str(path.relative_to(ROOT)) for path in stale]
    assert not names, f"run `python monitoring/generate.py`: stale {names}"


def test_config_names_shipped_files():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (MONITORING / rule_file).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"prometheus", "tiled", "node", "haproxy"}
    for name in ("tiled", "node", "haproxy"):
        files = jobs[name]["file_sd_configs"][0]["files"]
        assert files == [f"targets/{name}.yml"], name
        assert (MONITORING / files[0]).is_file(), files[0]


def recording_rules() -> list[dict]:
    data = yaml.safe_load((MONITORING / "rules" / "recording.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_recording_rule_names_follow_convention():
    names = [rule["record"] for rule in recording_rules()]
    assert len(names) == len(set(names)), "duplicate recording rule"
    for name in names:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name


def test_recording_rules_have_comments():
    lines = (MONITORING / "rules" / "recording.yml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("- record:"):
            previous = lines[index - 1].strip()
            assert previous.startswith("#"), f"no comment above {line.strip()}"


def test_latency_objective_is_bucket_boundary():
    threshold = generate.load_thresholds()["latency_slo"]["threshold_seconds"]
    assert threshold in LATENCY_BUCKETS
    recording = (MONITORING / "rules" / "recording.yml").read_text()
    boundaries = set(re.findall(r'le="([^"]+)"', recording))
    assert boundaries == {f"{threshold:g}"}


def test_alerts_come_in_severity_pairs():
    data = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    severities: dict[str, set[str]] = {}
    for group in data["groups"]:
        for rule in group["rules"]:
            severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]
    for name, found in severities.items():
        assert found == {"warning", "critical"}, name
    expected = {
        "TiledErrorRatioHigh",
        "TiledLatencyBudgetBurn",
        "TiledStoreNearlyFull",
        "NodeFilesystemNearlyFull",
        "TargetDown",
        "TiledScrapeMissing",
        "TiledEventLoopLagHigh",
    }
    assert set(severities) == expected


def test_every_alert_has_unit_test():
    data = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in data["groups"] for rule in group["rules"]}
    tested = set()
    for path in PROMTOOL_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                tested.add(check["alertname"])
    assert alerts <= tested, f"alerts without a promtool test: {alerts - tested}"


def test_promtool_tests_order_all_groups():
    for path in PROMTOOL_TESTS:
        spec = yaml.safe_load(path.read_text())
        has_alert_tests = any("alert_rule_test" in case for case in spec["tests"])
        if not has_alert_tests:
            continue
        groups = []
        for rule_file in spec["rule_files"]:
            data = yaml.safe_load((path.parent / rule_file).read_text())
            groups.extend(group["name"] for group in data["groups"])
        # promtool accepts a partial order silently, so check it is complete.
        assert spec.get("group_eval_order") == groups, path.name
