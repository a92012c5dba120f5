"""Filter that adapts the repository's prometheus.yml to an installed layout."""

from __future__ import annotations

import copy
import posixpath
from typing import Any

# Used when the repository has no prometheus.yml: the same jobs and target
# files, so the rest of the role does not depend on which one is in use.
MINIMAL_CONFIG: dict[str, Any] = {
    "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
    "rule_files": ["rules/*.yml"],
    "scrape_configs": [
        {"job_name": "prometheus", "static_configs": [{"targets": ["127.0.0.1:9090"]}]},
    ],
}


def _absolute(path: str, config_dir: str) -> str:
    return path if posixpath.isabs(path) else posixpath.join(config_dir, path)


def tiled_prometheus_config(
    source: dict[str, Any] | None,
    config_dir: str,
    file_sd_jobs: list[str],
    global_defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return ``source`` (or a minimal config) ready to install in ``config_dir``.

    Relative rule and service-discovery paths become absolute, because
    ``promtool check config`` resolves them against the file it checks, and
    Ansible validates a temporary copy in another folder. Each job named in
    ``file_sd_jobs`` reads its targets from ``<config_dir>/targets/<job>.yml``,
    and such a job missing from ``source`` is added.
    """
    config = copy.deepcopy(source) if source else copy.deepcopy(MINIMAL_CONFIG)
    config.setdefault("global", {})
    for key, value in (global_defaults or {}).items():
        config["global"].setdefault(key, value)
    config["rule_files"] = [
        _absolute(path, config_dir) for path in config.get("rule_files") or []
    ]

    scrape_configs = config.setdefault("scrape_configs", [])
    for alerting in (config.get("alerting") or {}).get("alertmanagers") or []:
        _absolute_file_sd(alerting, config_dir)
    present = set()
    for job in scrape_configs:
        present.add(job.get("job_name"))
        _absolute_file_sd(job, config_dir)
        if job.get("job_name") in file_sd_jobs and not job.get("file_sd_configs"):
            job.pop("static_configs", None)
            job["file_sd_configs"] = [_targets_file(job["job_name"], config_dir)]
    for name in file_sd_jobs:
        if name not in present:
            scrape_configs.append(
                {"job_name": name, "file_sd_configs": [_targets_file(name, config_dir)]}
            )
    return config


def _absolute_file_sd(section: dict[str, Any], config_dir: str) -> None:
    for sd in section.get("file_sd_configs") or []:
        sd["files"] = [_absolute(path, config_dir) for path in sd.get("files") or []]


def _targets_file(job_name: str, config_dir: str) -> dict[str, Any]:
    return {"files": [posixpath.join(config_dir, "targets", f"{job_name}.yml")]}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"tiled_prometheus_config": tiled_prometheus_config}
