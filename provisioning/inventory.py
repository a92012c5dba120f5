"""Ansible inventory built from a cluster description."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .cluster import Cluster

# Inventory group of each cluster role; the playbooks target these groups.
GROUPS = {
    "storage": "tiled_storage",
    "front": "tiled_front",
    "monitoring": "tiled_monitoring",
}


def build_inventory(cluster: Cluster, wheelhouse: str | Path) -> dict[str, Any]:
    """Return the YAML inventory of ``cluster`` as a dict.

    Host variables sit under ``all.hosts`` and the groups only list members, so
    each variable is defined once however many roles a node has. Per-node
    ``vars`` override the cluster-wide ``vars``, which override the defaults.
    """
    all_vars: dict[str, Any] = {
        "ansible_user": cluster.ssh.user,
        "ansible_port": cluster.ssh.port,
        "ansible_python_interpreter": "/usr/bin/python3",
        "tiled_storage_wheelhouse_src": str(wheelhouse),
        "tiled_storage_version": cluster.tiled.version,
        "tiled_storage_port": cluster.tiled.port,
        "tiled_front_port": cluster.front.port,
        "tiled_front_stats_port": cluster.front.stats_port,
        "tiled_front_storage_port": cluster.tiled.port,
        "tiled_monitoring_tiled_port": cluster.tiled.port,
        "tiled_monitoring_haproxy_stats_port": cluster.front.stats_port,
    }
    if cluster.ssh.private_key:
        all_vars["ansible_ssh_private_key_file"] = cluster.ssh.private_key
    if not cluster.ssh.host_key_checking:
        all_vars["ansible_ssh_common_args"] = (
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        )
    all_vars.update(cluster.vars)

    hosts: dict[str, dict[str, Any]] = {}
    for node in cluster.nodes:
        host_vars: dict[str, Any] = {"ansible_host": node.address}
        if node.disk:
            host_vars["tiled_storage_data_device"] = node.disk
        host_vars.update(node.vars)
        hosts[node.name] = host_vars

    children: dict[str, Any] = {}
    for role, group in GROUPS.items():
        members = [node.name for node in cluster.with_role(role)]
        children[group] = {"hosts": dict.fromkeys(members)}
    return {"all": {"vars": all_vars, "hosts": hosts, "children": children}}


def write_inventory(cluster: Cluster, wheelhouse: str | Path, path: Path) -> Path:
    """Write the inventory of ``cluster`` to ``path`` and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(build_inventory(cluster, wheelhouse), sort_keys=False)
    path.write_text("# Written by tiled-provision; edits are overwritten.\n" + text)
    return path
