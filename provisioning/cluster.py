"""Cluster description: loading and validation of the YAML file."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROLES = ("storage", "monitoring", "front")

# An Ansible inventory host name that is also a valid systemd machine name.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

TOP_KEYS = {"name", "ssh", "tiled", "front", "vars", "nodes"}
SSH_KEYS = {"user", "private_key", "port", "host_key_checking"}
TILED_KEYS = {"version", "wheel", "wheelhouse", "port"}
FRONT_KEYS = {"port", "stats_port"}
NODE_KEYS = {"name", "address", "roles", "disk", "vars"}


class ClusterError(ValueError):
    """Raised when a cluster file is invalid; ``errors`` lists every problem."""

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        lines = "\n".join(f"  - {error}" for error in errors)
        super().__init__(f"{path}: invalid cluster file:\n{lines}")


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    address: str
    roles: tuple[str, ...]
    disk: str | None = None
    vars: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SshSettings:
    user: str = "root"
    private_key: str | None = None
    port: int = 22
    # Off only for throw-away test hosts whose keys change on every boot.
    host_key_checking: bool = True


@dataclasses.dataclass(frozen=True)
class TiledSettings:
    # Exact tiled-wsi version to install; empty installs the newest in the wheelhouse.
    version: str = ""
    # A built tiled-wsi wheel to install instead of building the repository.
    wheel: str | None = None
    # A ready wheelhouse folder; no wheels are built when it is given.
    wheelhouse: str | None = None
    port: int = 8000


@dataclasses.dataclass(frozen=True)
class FrontSettings:
    port: int = 80
    stats_port: int = 8404


@dataclasses.dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    ssh: SshSettings = SshSettings()
    tiled: TiledSettings = TiledSettings()
    front: FrontSettings = FrontSettings()
    vars: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def with_role(self, role: str) -> list[Node]:
        return [node for node in self.nodes if role in node.roles]


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster file; raise ClusterError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ClusterError(
            str(path), [f"cannot read the file: {error.strerror}"]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ClusterError(str(path), [f"invalid YAML: {error}"]) from None
    return parse_cluster(data, str(path), base_dir=path.parent)


def parse_cluster(
    data: Any, origin: str = "<cluster>", base_dir: Path | None = None
) -> Cluster:
    """Validate parsed YAML; relative paths are taken from ``base_dir``."""
    errors: list[str] = []
    if not isinstance(data, Mapping):
        raise ClusterError(
            origin, ["the top level must be a mapping with a 'nodes' list"]
        )
    _unknown_keys(data, TOP_KEYS, "", errors)

    ssh = _parse_ssh(_section(data, "ssh", errors), errors, base_dir)
    tiled = _parse_tiled(_section(data, "tiled", errors), errors, base_dir)
    front = _parse_front(_section(data, "front", errors), errors)
    extra_vars = _section(data, "vars", errors)

    name = data.get("name", "tiled")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        errors.append(
            f"name: invalid cluster name {name!r}; use letters, digits, '.', '_', '-'"
        )
        name = "tiled"

    raw_nodes = data.get("nodes")
    nodes: list[Node] = []
    if raw_nodes is None:
        errors.append("nodes: missing; list the cluster's nodes")
    elif not isinstance(raw_nodes, list) or not raw_nodes:
        errors.append("nodes: must be a non-empty list")
    else:
        for index, raw in enumerate(raw_nodes):
            node = _parse_node(index, raw, errors)
            if node is not None:
                nodes.append(node)
        _check_cluster_wide(nodes, front, tiled, errors)

    if errors:
        raise ClusterError(origin, errors)
    return Cluster(
        name=name,
        nodes=tuple(nodes),
        ssh=ssh,
        tiled=tiled,
        front=front,
        vars=dict(extra_vars),
    )


def _section(data: Mapping[str, Any], key: str, errors: list[str]) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.append(f"{key}: must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _unknown_keys(
    data: Mapping[str, Any], allowed: set[str], where: str, errors: list[str]
) -> None:
    for key in data:
        if key not in allowed:
            field = f"{where}.{key}" if where else str(key)
            expected = ", ".join(sorted(allowed))
            errors.append(f"{field}: unknown key; expected one of: {expected}")


def _port(value: Any, field: str, errors: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        errors.append(f"{field}: invalid port {value!r}; expected an integer 1-65535")
        return 0
    return value


def _path(
    value: Any, field: str, errors: list[str], base_dir: Path | None
) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        errors.append(f"{field}: must be a path, got {value!r}")
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(path)


def _parse_ssh(
    data: Mapping[str, Any], errors: list[str], base_dir: Path | None
) -> SshSettings:
    _unknown_keys(data, SSH_KEYS, "ssh", errors)
    user = data.get("user", "root")
    if not isinstance(user, str) or not user:
        errors.append(f"ssh.user: must be a user name, got {user!r}")
        user = "root"
    key = _path(data.get("private_key"), "ssh.private_key", errors, base_dir)
    if key is not None and not Path(key).is_file():
        errors.append(f"ssh.private_key: file not found: {key}")
    checking = data.get("host_key_checking", True)
    if not isinstance(checking, bool):
        errors.append(f"ssh.host_key_checking: must be true or false, got {checking!r}")
        checking = True
    return SshSettings(
        user=user,
        private_key=key,
        port=_port(data.get("port", 22), "ssh.port", errors),
        host_key_checking=checking,
    )


def _parse_tiled(
    data: Mapping[str, Any], errors: list[str], base_dir: Path | None
) -> TiledSettings:
    _unknown_keys(data, TILED_KEYS, "tiled", errors)
    version = data.get("version", "")
    if version is None:
        version = ""
    if not isinstance(version, str) or (
        version and not re.match(r"^[0-9][\w.+!-]*$", version)
    ):
        errors.append(f"tiled.version: invalid version {version!r}; use e.g. '0.1.0'")
        version = ""
    wheel = _path(data.get("wheel"), "tiled.wheel", errors, base_dir)
    if wheel is not None and not (wheel.endswith(".whl") and Path(wheel).is_file()):
        errors.append(f"tiled.wheel: not a wheel file: {wheel}")
    wheelhouse = _path(data.get("wheelhouse"), "tiled.wheelhouse", errors, base_dir)
    if wheelhouse is not None and not Path(wheelhouse).is_dir():
        errors.append(f"tiled.wheelhouse: folder not found: {wheelhouse}")
    if wheel is not None and wheelhouse is not None:
        errors.append("tiled.wheel: give either a wheel or a wheelhouse, not both")
    return TiledSettings(
        version=version,
        wheel=wheel,
        wheelhouse=wheelhouse,
        port=_port(data.get("port", 8000), "tiled.port", errors),
    )


def _parse_front(data: Mapping[str, Any], errors: list[str]) -> FrontSettings:
    _unknown_keys(data, FRONT_KEYS, "front", errors)
    return FrontSettings(
        port=_port(data.get("port", 80), "front.port", errors),
        stats_port=_port(data.get("stats_port", 8404), "front.stats_port", errors),
    )


def _valid_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        labels = address.rstrip(".").split(".")
        # A name made only of digits and dots is a mistyped IPv4 address.
        if all(label.isdigit() for label in labels):
            return False
        return len(address) <= 253 and all(
            HOSTNAME_LABEL.match(label) for label in labels
        )
    return not (ip.is_unspecified or ip.is_multicast)


def _parse_node(index: int, raw: Any, errors: list[str]) -> Node | None:
    where = f"nodes[{index}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{where}: must be a mapping with name, address and roles")
        return None
    name = raw.get("name")
    if isinstance(name, str) and NAME_PATTERN.match(name):
        where = f"{where} ({name})"
    else:
        errors.append(
            f"{where}.name: {'missing' if name is None else f'invalid name {name!r}'}; "
            "use letters, digits, '.', '_' or '-' (at most 63)"
        )
        name = None
    _unknown_keys(raw, NODE_KEYS, where, errors)

    address = raw.get("address")
    if address is None:
        errors.append(f"{where}.address: missing; give an IP address or a DNS name")
    elif not isinstance(address, str) or not _valid_address(address):
        errors.append(f"{where}.address: invalid address {address!r}")
        address = None

    roles = raw.get("roles")
    if roles is None:
        errors.append(f"{where}.roles: missing; give a list of {', '.join(ROLES)}")
        roles = []
    elif not isinstance(roles, list) or not roles:
        errors.append(f"{where}.roles: must be a non-empty list of {', '.join(ROLES)}")
        roles = []
    else:
        for role in roles:
            if role not in ROLES:
                errors.append(
                    f"{where}.roles: unknown role {role!r}; expected {', '.join(ROLES)}"
                )
        if len(set(map(str, roles))) != len(roles):
            errors.append(f"{where}.roles: a role is listed twice")

    disk = raw.get("disk")
    if "storage" in roles:
        if disk is None:
            errors.append(
                f"{where}.disk: missing; storage nodes need a data disk"
                " such as /dev/sdb"
            )
        elif not isinstance(disk, str) or not re.match(r"^/dev/[\w./-]+$", disk):
            errors.append(
                f"{where}.disk: invalid device {disk!r}; expected a path under /dev/"
            )
    elif disk is not None:
        errors.append(f"{where}.disk: only storage nodes take a data disk")

    node_vars = raw.get("vars") or {}
    if not isinstance(node_vars, Mapping):
        errors.append(f"{where}.vars: must be a mapping of Ansible variables")
        node_vars = {}

    if name is None or address is None:
        return None
    return Node(
        name=name,
        address=address,
        roles=tuple(role for role in roles if role in ROLES),
        disk=disk if isinstance(disk, str) else None,
        vars=dict(node_vars),
    )


def _check_cluster_wide(
    nodes: list[Node], front: FrontSettings, tiled: TiledSettings, errors: list[str]
) -> None:
    seen_names: dict[str, int] = {}
    seen_addresses: dict[str, str] = {}
    for index, node in enumerate(nodes):
        if node.name in seen_names:
            errors.append(f"nodes[{index}] ({node.name}).name: duplicate node name")
        seen_names.setdefault(node.name, index)
        key = node.address.lower()
        if key in seen_addresses:
            errors.append(
                f"nodes[{index}] ({node.name}).address: {node.address} is also the "
                f"address of {seen_addresses[key]}"
            )
        seen_addresses.setdefault(key, node.name)
    if nodes and not any("storage" in node.roles for node in nodes):
        errors.append("nodes: no node has the storage role; at least one is needed")
    for node in nodes:
        if (
            "front" in node.roles
            and "storage" in node.roles
            and front.port == tiled.port
        ):
            errors.append(
                f"front.port: {front.port} is also tiled.port,"
                f" and {node.name} runs both"
            )
