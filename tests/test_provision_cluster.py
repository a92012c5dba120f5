"""Cluster file validation and inventory rendering of tiled-provision."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioning.cluster import ClusterError, load_cluster, parse_cluster
from provisioning.inventory import build_inventory, write_inventory

VALID: dict[str, Any] = {
    "name": "lab",
    "ssh": {"user": "deploy", "port": 2222},
    "tiled": {"version": "0.1.0", "port": 8100},
    "front": {"port": 8080, "stats_port": 8404},
    "vars": {"tiled_storage_sysctl_apply": "never"},
    "nodes": [
        {
            "name": "store1",
            "address": "192.0.2.11",
            "roles": ["storage", "front"],
            "disk": "/dev/sdb",
        },
        {
            "name": "store2",
            "address": "store2.example.org",
            "roles": ["storage"],
            "disk": "/dev/nvme1n1",
            "vars": {"tiled_storage_workers": 4},
        },
        {"name": "mon1", "address": "2001:db8::13", "roles": ["monitoring"]},
    ],
}


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ClusterError) as caught:
        parse_cluster(data, "cluster.yml")
    return caught.value.errors


def modified(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    for path, value in changes.items():
        target = data
        *parents, last = path.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is ...:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return data


def test_valid_cluster_parses() -> None:
    cluster = parse_cluster(copy.deepcopy(VALID))

    assert [node.name for node in cluster.nodes] == ["store1", "store2", "mon1"]
    assert [node.name for node in cluster.with_role("storage")] == ["store1", "store2"]
    assert cluster.ssh.user == "deploy"
    assert cluster.ssh.port == 2222
    assert cluster.ssh.host_key_checking is True
    assert cluster.tiled.port == 8100
    assert cluster.nodes[1].vars == {"tiled_storage_workers": 4}


def test_minimal_cluster_uses_defaults() -> None:
    cluster = parse_cluster(
        {
            "nodes": [
                {
                    "name": "a",
                    "address": "10.0.0.1",
                    "roles": ["storage"],
                    "disk": "/dev/vdb",
                }
            ]
        }
    )

    assert cluster.name == "tiled"
    assert cluster.ssh.user == "root"
    assert cluster.tiled.port == 8000
    assert cluster.front.port == 80


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (modified(nodes__1__disk=...), "nodes[1] (store2).disk: missing"),
        (modified(nodes__0__colour="blue"), "nodes[0] (store1).colour: unknown key"),
        (modified(sshh={}), "sshh: unknown key"),
        (modified(ssh__password="x"), "ssh.password: unknown key"),
        (modified(tiled__image="x"), "tiled.image: unknown key"),
        (
            modified(nodes__1__name="store1"),
            "nodes[1] (store1).name: duplicate node name",
        ),
        (
            modified(nodes__2__address="192.0.2.11"),
            "nodes[2] (mon1).address: 192.0.2.11 is also the address of store1",
        ),
        (
            modified(nodes__0__address="10.0.0.300"),
            "nodes[0] (store1).address: invalid",
        ),
        (modified(nodes__0__address="bad_host!"), "nodes[0] (store1).address: invalid"),
        (modified(nodes__0__address="0.0.0.0"), "nodes[0] (store1).address: invalid"),
        (modified(nodes__0__address=...), "nodes[0] (store1).address: missing"),
        (
            modified(nodes__0__roles=["storage", "db"]),
            "nodes[0] (store1).roles: unknown role 'db'",
        ),
        (
            modified(nodes__0__roles=[]),
            "nodes[0] (store1).roles: must be a non-empty list",
        ),
        (
            modified(nodes__0__disk="sdb"),
            "nodes[0] (store1).disk: invalid device 'sdb'",
        ),
        (
            modified(nodes__2__disk="/dev/sdc"),
            "nodes[2] (mon1).disk: only storage nodes",
        ),
        (modified(nodes__0__name="bad name"), "nodes[0].name: invalid name 'bad name'"),
        (modified(nodes__0__name=...), "nodes[0].name: missing"),
        (modified(ssh__port=70000), "ssh.port: invalid port 70000"),
        (modified(tiled__port="8000"), "tiled.port: invalid port '8000'"),
        (modified(tiled__version="latest!"), "tiled.version: invalid version"),
        (modified(front__port=8100), "front.port: 8100 is also tiled.port"),
        (modified(nodes=[]), "nodes: must be a non-empty list"),
        (modified(nodes=...), "nodes: missing"),
        (
            modified(ssh__private_key="/nonexistent/key"),
            "ssh.private_key: file not found",
        ),
        (
            modified(tiled__wheelhouse="/nonexistent/wh"),
            "tiled.wheelhouse: folder not found",
        ),
    ],
)
def test_invalid_cluster_names_node_and_field(data: dict, expected: str) -> None:
    errors = errors_of(data)

    assert any(error.startswith(expected) for error in errors), errors


def test_cluster_without_storage_node_rejected() -> None:
    data = modified(nodes__0__roles=["front"], nodes__1__roles=["monitoring"])
    del data["nodes"][0]["disk"]
    del data["nodes"][1]["disk"]

    errors = errors_of(data)

    assert errors == ["nodes: no node has the storage role; at least one is needed"]


def test_every_error_reported_at_once() -> None:
    data = modified(nodes__1__disk=..., nodes__2__colour="blue", ssh__port=0)

    errors = errors_of(data)

    assert len(errors) == 3


def test_non_mapping_top_level_rejected() -> None:
    assert errors_of(["nodes"]) == [
        "the top level must be a mapping with a 'nodes' list"
    ]


def test_load_cluster_reports_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    path.write_text("nodes: [\n")

    with pytest.raises(ClusterError) as caught:
        load_cluster(path)

    assert caught.value.errors[0].startswith("invalid YAML")
    assert str(path) in str(caught.value)


def test_load_cluster_resolves_paths_from_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("key")
    data = modified(ssh__private_key="keys/id")
    path = tmp_path / "cluster.yml"
    path.write_text(yaml.safe_dump(data))

    cluster = load_cluster(path)

    assert cluster.ssh.private_key == str(tmp_path / "keys" / "id")


def test_inventory_groups_and_host_vars() -> None:
    cluster = parse_cluster(copy.deepcopy(VALID))

    inventory = build_inventory(cluster, "/tmp/wheelhouse")["all"]

    children = inventory["children"]
    assert list(children["tiled_storage"]["hosts"]) == ["store1", "store2"]
    assert list(children["tiled_front"]["hosts"]) == ["store1"]
    assert list(children["tiled_monitoring"]["hosts"]) == ["mon1"]
    hosts = inventory["hosts"]
    assert hosts["store1"] == {
        "ansible_host": "192.0.2.11",
        "tiled_storage_data_device": "/dev/sdb",
    }
    assert hosts["store2"]["tiled_storage_workers"] == 4
    assert hosts["mon1"] == {"ansible_host": "2001:db8::13"}


def test_inventory_cluster_vars() -> None:
    cluster = parse_cluster(copy.deepcopy(VALID))

    all_vars = build_inventory(cluster, "/tmp/wheelhouse")["all"]["vars"]

    assert all_vars["ansible_user"] == "deploy"
    assert all_vars["ansible_port"] == 2222
    assert all_vars["ansible_python_interpreter"] == "/usr/bin/python3"
    assert all_vars["tiled_storage_wheelhouse_src"] == "/tmp/wheelhouse"
    assert all_vars["tiled_storage_version"] == "0.1.0"
    assert all_vars["tiled_storage_port"] == 8100
    assert all_vars["tiled_front_storage_port"] == 8100
    assert all_vars["tiled_monitoring_tiled_port"] == 8100
    assert all_vars["tiled_front_port"] == 8080
    assert all_vars["tiled_storage_sysctl_apply"] == "never"
    assert "ansible_ssh_common_args" not in all_vars


def test_inventory_without_host_key_checking() -> None:
    cluster = parse_cluster(modified(ssh__host_key_checking=False))

    all_vars = build_inventory(cluster, "/w")["all"]["vars"]

    assert "StrictHostKeyChecking=no" in all_vars["ansible_ssh_common_args"]


def test_written_inventory_is_yaml(tmp_path: Path) -> None:
    cluster = parse_cluster(copy.deepcopy(VALID))

    path = write_inventory(cluster, "/w", tmp_path / "sub" / "inventory.yml")

    assert yaml.safe_load(path.read_text()) == build_inventory(cluster, "/w")
