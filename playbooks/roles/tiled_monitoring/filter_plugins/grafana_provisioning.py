"""Filters that point the repository's Grafana provisioning files at this node."""

from __future__ import annotations

import copy
from typing import Any


def tiled_grafana_datasources(
    source: dict[str, Any] | None, url: str
) -> dict[str, Any]:
    """Return datasource provisioning with every Prometheus datasource at ``url``.

    Without a ``source`` it returns one default Prometheus datasource.
    """
    config = copy.deepcopy(source) if source else {"apiVersion": 1, "datasources": []}
    datasources = config.setdefault("datasources", [])
    prometheus = [item for item in datasources if item.get("type") == "prometheus"]
    if not prometheus:
        prometheus = [
            {
                "name": "Prometheus",
                "uid": "prometheus",
                "type": "prometheus",
                "access": "proxy",
                "isDefault": True,
                "editable": False,
            }
        ]
        datasources.extend(prometheus)
    for item in prometheus:
        item["url"] = url
    return config


def tiled_grafana_dashboards(
    source: dict[str, Any] | None, path: str
) -> dict[str, Any]:
    """Return dashboard provisioning whose file providers read ``path``."""
    config = copy.deepcopy(source) if source else {"apiVersion": 1, "providers": []}
    providers = config.setdefault("providers", [])
    if not providers:
        providers.append(
            {
                "name": "tiled",
                "folder": "tiled",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
            }
        )
    for provider in providers:
        if provider.get("type", "file") == "file":
            provider.setdefault("options", {})["path"] = path
    return config


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "tiled_grafana_datasources": tiled_grafana_datasources,
            "tiled_grafana_dashboards": tiled_grafana_dashboards,
        }
