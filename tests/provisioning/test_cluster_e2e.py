"""End to end: provision three systemd-nspawn hosts and use the cluster.

The tests run in file order and share one cluster: the rejected cluster file
comes first (nothing may have changed yet), then the converge, the idempotent
rerun, the check-mode run and the checks on the running services. The last
test stops tiled on one node and starts it again.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.provision

REPO_ROOT = Path(__file__).resolve().parents[2]
FRONT_PORT = 80
TILED_PORT = 8000
SUMMARY_LINE = re.compile(
    r"^\s+(?P<host>\S+)\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"failed=(?P<failed>\d+)\s+unreachable=(?P<unreachable>\d+)",
    re.MULTILINE,
)


def http_get(url: str, timeout: float = 10) -> tuple[int, Message, bytes]:
    """Send a GET request and return the status, headers and body, even on errors.

    The headers object looks names up case-insensitively: HAProxy sends them
    in lower case.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def provision(
    cluster_file: Path, workdir: Path, *args: str
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "provisioning",
        str(cluster_file),
        "--workdir",
        str(workdir),
        *args,
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900
    )
    # Shown by pytest when the test fails.
    print(result.stdout[-20000:])
    print(result.stderr[-5000:], file=sys.stderr)
    return result


def summary_of(output: str) -> dict[str, dict[str, int]]:
    return {
        match["host"]: {
            key: int(match[key]) for key in ("ok", "changed", "failed", "unreachable")
        }
        for match in SUMMARY_LINE.finditer(output.split("SUMMARY", 1)[-1])
    }


@pytest.fixture(scope="module")
def cluster_file(test_hosts: dict, slide_dir: Path) -> Path:
    store1, store2, mon1 = (test_hosts[name] for name in ("store1", "store2", "mon1"))
    description = {
        "name": "e2e",
        "ssh": {
            "user": "root",
            "private_key": str(test_hosts["key"]),
            # The test hosts get new host keys on every run.
            "host_key_checking": False,
        },
        "tiled": {"port": TILED_PORT},
        "front": {"port": FRONT_PORT, "stats_port": 8404},
        "vars": {
            # The hosts have no route out, so apt installs from their preloaded cache.
            "tiled_storage_apt_update_cache": False,
            "tiled_front_apt_update_cache": False,
            "tiled_monitoring_apt_update_cache": False,
            "tiled_storage_slides_src": str(slide_dir),
        },
        "nodes": [
            {
                "name": "store1",
                "address": store1.address,
                "roles": ["storage", "front"],
                "disk": store1.loop_device,
            },
            {
                "name": "store2",
                "address": store2.address,
                "roles": ["storage"],
                "disk": store2.loop_device,
            },
            {"name": "mon1", "address": mon1.address, "roles": ["monitoring"]},
        ],
    }
    path = test_hosts["workdir"] / "cluster.yml"
    path.write_text(yaml.safe_dump(description, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run_dir(test_hosts: dict) -> Path:
    return test_hosts["workdir"] / "provision"


def test_bad_cluster_file_changes_nothing(
    test_hosts: dict, cluster_file: Path, tmp_path: Path
) -> None:
    description = yaml.safe_load(cluster_file.read_text())
    del description["nodes"][1]["disk"]
    description["nodes"][2]["colour"] = "blue"
    bad_file = tmp_path / "bad.yml"
    bad_file.write_text(yaml.safe_dump(description))
    workdir = tmp_path / "run"

    result = provision(bad_file, workdir)

    assert result.returncode == 2
    assert "nodes[1] (store2).disk: missing" in result.stderr
    assert "nodes[2] (mon1).colour: unknown key" in result.stderr
    assert not workdir.exists(), "a rejected file must not write an inventory"
    for name in ("store1", "store2", "mon1"):
        probe = test_hosts[name].shell(
            "test -e /etc/tiled || test -e /srv/tiled", False
        )
        assert probe.returncode != 0, f"{name} was changed"


def test_converge(cluster_file: Path, run_dir: Path) -> None:
    result = provision(cluster_file, run_dir)

    assert result.returncode == 0
    summary = summary_of(result.stdout)
    assert set(summary) == {"store1", "store2", "mon1"}
    for host, counts in summary.items():
        assert counts["failed"] == 0, host
        assert counts["unreachable"] == 0, host


def test_second_run_changes_nothing(cluster_file: Path, run_dir: Path) -> None:
    result = provision(
        cluster_file, run_dir, "--wheelhouse", str(run_dir / "wheelhouse")
    )

    assert result.returncode == 0
    summary = summary_of(result.stdout)
    assert set(summary) == {"store1", "store2", "mon1"}
    changed = {host: counts["changed"] for host, counts in summary.items()}
    assert changed == {"store1": 0, "store2": 0, "mon1": 0}


def test_check_mode_after_converge(cluster_file: Path, run_dir: Path) -> None:
    # One storage node is enough to cover the check-mode paths of the roles
    # that matter (disk, pip, templates) and keeps the run short.
    result = provision(
        cluster_file,
        run_dir,
        "--wheelhouse",
        str(run_dir / "wheelhouse"),
        "--check",
        "--diff",
        "--limit",
        "store2",
    )

    assert result.returncode == 0
    summary = summary_of(result.stdout)
    assert set(summary) == {"store2"}
    assert summary["store2"]["failed"] == 0


def test_data_volume_and_service(test_hosts: dict) -> None:
    for name in ("store1", "store2"):
        host = test_hosts[name]
        mount = host.shell("findmnt -n -o FSTYPE,OPTIONS,LABEL /srv/tiled").stdout
        assert mount.split()[0] == "xfs", name
        assert "noatime" in mount, name
        user = host.shell("systemctl show -p User --value tiled").stdout.strip()
        assert user == "tiled", name
        state = host.shell("systemctl is-active tiled", False).stdout.strip()
        assert state == "active", name


def test_unit_refuses_to_start_without_volume(test_hosts: dict) -> None:
    host = test_hosts["store2"]
    host.shell("systemctl stop tiled && umount /srv/tiled")
    try:
        start = host.shell("systemctl start tiled", check=False)
        state = host.shell("systemctl is-active tiled", check=False).stdout.strip()
    finally:
        host.shell("mount /srv/tiled && systemctl start tiled")
        wait_healthy(host.address)

    assert start.returncode != 0
    assert state != "active"


def slide_ids(address: str) -> list[str]:
    status, _, body = http_get(f"http://{address}:{TILED_PORT}/slides")
    assert status == 200, body[:500]
    data = json.loads(body)
    slides = data["slides"] if isinstance(data, dict) else data
    return [slide["id"] for slide in slides]


def wait_healthy(address: str, timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            if http_get(f"http://{address}:{TILED_PORT}/healthz", 2)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{address} not healthy"
        time.sleep(0.5)


def test_tile_through_front_matches_nodes(test_hosts: dict) -> None:
    store1, store2 = test_hosts["store1"], test_hosts["store2"]
    ids = slide_ids(store1.address)
    assert ids, "no slides found on store1"
    assert slide_ids(store2.address) == ids
    tile_path = f"/slides/{ids[0]}_files/11/1_1.jpeg"

    status, headers, via_front = http_get(
        f"http://{store1.address}:{FRONT_PORT}{tile_path}"
    )
    direct = {
        host.name: http_get(f"http://{host.address}:{TILED_PORT}{tile_path}")
        for host in (store1, store2)
    }

    assert status == 200
    assert headers.get("Content-Type") == "image/jpeg"
    assert via_front[:2] == b"\xff\xd8"
    assert headers.get("X-Served-By") in {"store1", "store2"}
    # Every protocol's path for one slide hashes to the same node.
    for path in (f"/slides/{ids[0]}.dzi", f"/iiif/3/{ids[0]}/info.json"):
        other_status, other_headers, _ = http_get(
            f"http://{store1.address}:{FRONT_PORT}{path}"
        )
        assert other_status == 200, path
        assert other_headers.get("X-Served-By") == headers.get("X-Served-By"), path
    for name, (direct_status, _, body) in direct.items():
        assert direct_status == 200, name
        assert body == via_front, f"tile from {name} differs from the front's"


def test_prometheus_targets_up(test_hosts: dict) -> None:
    url = f"http://{test_hosts['mon1'].address}:9090/api/v1/targets"
    deadline = time.monotonic() + 90
    while True:
        status, _, body = http_get(url)
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        health = {
            (target["labels"]["job"], target["labels"]["instance"]): target["health"]
            for target in targets
        }
        if health and all(value == "up" for value in health.values()):
            break
        assert time.monotonic() < deadline, f"targets not all up: {health}"
        time.sleep(2)

    jobs = {job for job, _ in health}
    assert {"tiled", "node", "haproxy", "prometheus"} <= jobs
    tiled_targets = {instance for job, instance in health if job == "tiled"}
    assert tiled_targets == {
        f"{test_hosts[name].address}:{TILED_PORT}" for name in ("store1", "store2")
    }


def test_failover_moves_slides(test_hosts: dict) -> None:
    store1 = test_hosts["store1"]
    ids = slide_ids(store1.address)
    tile_path = f"/slides/{ids[0]}_files/11/0_0.jpeg"
    front = f"http://{store1.address}:{FRONT_PORT}{tile_path}"
    _, headers, expected = http_get(front)
    owner = test_hosts[headers["X-Served-By"]]
    other = "store2" if owner.name == "store1" else "store1"

    # Fetch the tile continuously while the owner's daemon goes away.
    results: list[tuple[float, int, str | None, bytes]] = []
    stop = threading.Event()

    def fetch_loop() -> None:
        while not stop.is_set() and len(results) < 2000:
            try:
                status, response_headers, body = http_get(front, timeout=5)
            except OSError as error:
                status, response_headers, body = 0, Message(), str(error).encode()
            results.append(
                (time.monotonic(), status, response_headers.get("X-Served-By"), body)
            )
            time.sleep(0.05)

    fetcher = threading.Thread(target=fetch_loop)
    fetcher.start()
    try:
        time.sleep(1)
        stopped_at = time.monotonic()
        owner.shell("systemctl stop tiled")
        # Two failed checks two seconds apart take the node out; allow slack.
        time.sleep(8)
    finally:
        stop.set()
        fetcher.join()
        owner.shell("systemctl start tiled")
    wait_healthy(owner.address)

    after = [result for result in results if result[0] > stopped_at + 6]
    assert after, "no requests after the health check interval"
    failed = [(status, body[:200]) for _, status, _, body in results if status != 200]
    assert not failed, f"requests failed during failover: {failed[:5]}"
    assert {server for _, _, server, _ in after} == {other}
    assert all(body == expected for *_, body in after)


def build_newer_wheelhouse(old: Path, target: Path) -> str:
    """Copy ``old``, add a tiled-wsi wheel of a higher version, return the version."""
    # Only what the wheel is built from: the rest of a work tree may hold
    # sockets or large benchmark data.
    source = target.parent / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, source)
    for package in ("tiled", "provisioning"):
        shutil.copytree(
            REPO_ROOT / package,
            source / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text()
    current = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert current, "no version line in pyproject.toml"
    # A local version label sorts above the same public version (PEP 440).
    version = f"{current[1]}+upgrade"
    pyproject.write_text(text.replace(current[0], f'version = "{version}"', 1))

    shutil.copytree(old, target)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    return version


def test_rolling_upgrade_keeps_serving(
    test_hosts: dict, cluster_file: Path, run_dir: Path, tmp_path: Path
) -> None:
    store1 = test_hosts["store1"]
    version = build_newer_wheelhouse(run_dir / "wheelhouse", tmp_path / "wheelhouse")
    ids = slide_ids(store1.address)
    front = f"http://{store1.address}:{FRONT_PORT}/slides/{ids[0]}_files/10/0_0.jpeg"
    statuses: list[int] = []
    servers: set[str | None] = set()
    stop = threading.Event()

    def fetch_loop() -> None:
        while not stop.is_set() and len(statuses) < 5000:
            try:
                status, headers, _ = http_get(front, timeout=5)
                servers.add(headers.get("X-Served-By"))
            except OSError:
                status = 0
            statuses.append(status)
            time.sleep(0.1)

    fetcher = threading.Thread(target=fetch_loop)
    fetcher.start()
    try:
        result = provision(
            cluster_file,
            run_dir,
            "--wheelhouse",
            str(tmp_path / "wheelhouse"),
            "--playbook",
            "upgrade.yml",
        )
    finally:
        stop.set()
        fetcher.join()

    assert result.returncode == 0
    assert statuses, "no requests were sent during the upgrade"
    assert set(statuses) == {200}, (
        f"failed requests: {len(statuses) - statuses.count(200)}"
    )
    assert servers == {"store1", "store2"}, "each node should have been drained in turn"
    for name in ("store1", "store2"):
        installed = (
            test_hosts[name]
            .shell("/opt/tiled/venv/bin/python -m pip show tiled-wsi")
            .stdout
        )
        assert f"Version: {version}" in installed, name
