"""Static checks of the playbooks: lint, syntax, rendered configs, filters."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PLAYBOOKS = REPO_ROOT / "playbooks"
MONITORING = REPO_ROOT / "monitoring"

INVENTORY = {
    "all": {
        "hosts": {
            "localhost": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
            },
            "store1": {"ansible_host": "192.0.2.11", "tiled_storage_port": 8100},
            "store2": {"ansible_host": "192.0.2.12"},
        },
        "children": {
            "tiled_storage": {"hosts": {"store1": None, "store2": None}},
            "tiled_front": {"hosts": {"store1": None}},
            "tiled_monitoring": {"hosts": {"localhost": None}},
        },
    }
}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def load_filter(name: str, role: str = "tiled_monitoring") -> ModuleType:
    path = PLAYBOOKS / "roles" / role / "filter_plugins" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(INVENTORY))
    return path


def test_playbooks_syntax(inventory: Path) -> None:
    ansible_playbook = need("ansible-playbook")

    result = subprocess.run(
        [
            ansible_playbook,
            "-i",
            str(inventory),
            "--syntax-check",
            "site.yml",
            "upgrade.yml",
        ],
        cwd=PLAYBOOKS,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_ansible_lint_production_profile() -> None:
    ansible_lint = need("ansible-lint")

    result = subprocess.run(
        [ansible_lint, "--offline", "site.yml", "upgrade.yml", "roles/"],
        cwd=PLAYBOOKS,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stderr


def test_haproxy_config_renders_valid(tmp_path: Path, inventory: Path) -> None:
    ansible_playbook = need("ansible-playbook")
    haproxy = need("haproxy")
    role = PLAYBOOKS / "roles" / "tiled_front"
    output = tmp_path / "haproxy.cfg"
    play = [
        {
            "name": "Render the HAProxy configuration.",
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(role / "defaults" / "main.yml")],
            "tasks": [
                {
                    "name": "Render it.",
                    "ansible.builtin.template": {
                        "src": str(role / "templates" / "haproxy.cfg.j2"),
                        "dest": str(output),
                        "mode": "0644",
                    },
                }
            ],
        }
    ]
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))

    rendered = subprocess.run(
        [ansible_playbook, "-i", str(inventory), str(playbook)],
        cwd=PLAYBOOKS,
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(output)], capture_output=True, text=True
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = output.read_text()
    assert "server store1 192.0.2.11:8100" in text
    assert "server store2 192.0.2.12:8000" in text
    assert "hash-type consistent" in text
    assert "use-service prometheus-exporter" in text


def test_repository_prometheus_config_valid(tmp_path: Path) -> None:
    promtool = need("promtool")
    module = load_filter("prometheus_config")
    source_file = MONITORING / "prometheus.yml"
    source = yaml.safe_load(source_file.read_text()) if source_file.is_file() else None
    (tmp_path / "rules").mkdir()
    for rules in (MONITORING / "rules").glob("*.yml"):
        shutil.copy(rules, tmp_path / "rules")
    (tmp_path / "targets").mkdir()
    for job in ("tiled", "node", "haproxy"):
        (tmp_path / "targets" / f"{job}.yml").write_text(
            "- targets: ['192.0.2.11:8000']\n"
        )
    (tmp_path / "targets" / "alertmanager.yml").write_text("[]\n")

    config = module.tiled_prometheus_config(
        source, str(tmp_path), ["tiled", "node", "haproxy"], {"scrape_interval": "30s"}
    )
    # Checked from another folder, as Ansible's validate does with its temp file.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(elsewhere / "prometheus.yml")],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert {"prometheus", "tiled", "node", "haproxy"} <= set(jobs)
    assert all(Path(path).is_absolute() for path in config["rule_files"])


def test_prometheus_filter_minimal_config() -> None:
    module = load_filter("prometheus_config")

    config = module.tiled_prometheus_config(None, "/etc/prometheus", ["tiled", "node"])

    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    by_name = {job["job_name"]: job for job in config["scrape_configs"]}
    assert by_name["tiled"]["file_sd_configs"] == [
        {"files": ["/etc/prometheus/targets/tiled.yml"]}
    ]
    assert "node" in by_name
    assert "prometheus" in by_name


def test_prometheus_filter_keeps_source_settings() -> None:
    module = load_filter("prometheus_config")
    source = {
        "global": {"scrape_interval": "5s"},
        "scrape_configs": [
            {"job_name": "tiled", "static_configs": [{"targets": ["127.0.0.1:8000"]}]},
            {"job_name": "other", "static_configs": [{"targets": ["x:1"]}]},
        ],
    }

    config = module.tiled_prometheus_config(
        source, "/etc/p", ["tiled"], {"scrape_interval": "1m"}
    )

    assert config["global"]["scrape_interval"] == "5s"
    by_name = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "static_configs" not in by_name["tiled"]
    assert by_name["other"]["static_configs"] == [{"targets": ["x:1"]}]
    assert source["scrape_configs"][0]["static_configs"], "the source must not change"


def test_grafana_filters_point_at_node() -> None:
    module = load_filter("grafana_provisioning")
    source = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "type": "prometheus",
                "url": "http://127.0.0.1:9090",
            },
            {"name": "Logs", "type": "loki", "url": "http://loki:3100"},
        ],
    }

    datasources = module.tiled_grafana_datasources(source, "http://mon1:9090")
    dashboards = module.tiled_grafana_dashboards(
        None, "/var/lib/grafana/dashboards/tiled"
    )

    assert datasources["datasources"][0]["url"] == "http://mon1:9090"
    assert datasources["datasources"][1]["url"] == "http://loki:3100"
    assert dashboards["providers"][0]["options"]["path"] == (
        "/var/lib/grafana/dashboards/tiled"
    )
    assert (
        module.tiled_grafana_datasources(None, "http://p:9090")["datasources"][0][
            "type"
        ]
        == "prometheus"
    )


def test_wheel_versions_sorted_by_pep440() -> None:
    module = load_filter("wheels", role="tiled_storage")
    paths = [
        "/w/tiled_wsi-0.2.0-py3-none-any.whl",
        "/w/tiled_wsi-0.2.0rc1-py3-none-any.whl",
        "/w/tiled_wsi-0.10.0-py3-none-any.whl",
        "/w/tiled_wsi-0.1.0.post1-py3-none-any.whl",
        "/w/numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",
        "/w/not-a-wheel.whl",
    ]

    versions = module.tiled_wheel_versions(paths, "tiled-wsi")

    assert versions == ["0.1.0.post1", "0.2.0rc1", "0.2.0", "0.10.0"]
