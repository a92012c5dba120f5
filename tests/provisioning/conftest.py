"""Fixtures of the provisioning end-to-end tests: booted test hosts and a slide."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nspawn_hosts
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_TOOLS = (
    "systemd-nspawn",
    "debootstrap",
    "losetup",
    "partx",
    "ip",
    "nsenter",
    "ssh",
    "ssh-keygen",
    "ansible-playbook",
)
REQUIRED_COLLECTIONS = ("community.general", "ansible.posix")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "provision: boots systemd-nspawn test hosts and runs the playbooks"
    )


def missing_requirements() -> list[str]:
    """Return what the end-to-end tests need and this machine lacks."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    for module in ("ansible_runner", "tifffile", "imagecodecs"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"Python package {module}")
    if shutil.which("ansible-galaxy"):
        listing = subprocess.run(
            ["ansible-galaxy", "collection", "list"], capture_output=True, text=True
        ).stdout
        missing += [name for name in REQUIRED_COLLECTIONS if name not in listing]
    return missing


def write_pyramidal_tiff(path: Path) -> None:
    """Write a 2048x1536 RGB tiled JPEG TIFF with three subresolution levels."""
    import tifffile

    y, x = np.mgrid[0:1536, 0:2048]
    rng = np.random.default_rng(7)
    level0 = np.stack(
        [
            (x * 255 // 2047),
            (y * 255 // 1535),
            ((x // 64 + y // 64) % 2) * 200,
        ],
        axis=-1,
    ).astype(np.uint8)
    level0 = np.clip(level0 + rng.integers(0, 24, level0.shape), 0, 255).astype(
        np.uint8
    )
    levels = [level0]
    while len(levels) < 4:
        previous = levels[-1].astype(np.uint16)
        half = (
            previous[0::2, 0::2]
            + previous[1::2, 0::2]
            + previous[0::2, 1::2]
            + previous[1::2, 1::2]
        ) // 4
        levels.append(half.astype(np.uint8))
    options = {
        "tile": (256, 256),
        "compression": "jpeg",
        "photometric": "rgb",
        "metadata": None,
    }
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], subifds=len(levels) - 1, **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("slides")
    write_pyramidal_tiff(directory / "synthetic.tiff")
    return directory


@pytest.fixture(scope="session")
def test_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Boot two storage hosts (the first also runs HAProxy) and a monitoring host.

    The finalizer stops the machines and removes the namespaces, overlays, loop
    devices and bridge even when a test fails, then checks that nothing is left.
    """
    missing = missing_requirements()
    if missing:
        pytest.skip("provisioning e2e needs: " + ", ".join(missing))
    # Keep the work folder short: it ends up in mount options and loop names.
    workdir = Path(tmp_path_factory.mktemp("hosts"))
    key, public_key = nspawn_hosts.make_ssh_key(workdir)
    with nspawn_hosts.cluster(workdir / "machines", public_key) as machines:
        gib = 1 << 30
        store1 = machines.add_host("store1", 1, disk_size_bytes=gib // 2)
        store2 = machines.add_host("store2", 2, disk_size_bytes=gib // 2)
        mon1 = machines.add_host("mon1", 3)
        machines.wait_for_ssh()
        yield {
            "machines": machines,
            "key": key,
            "workdir": workdir,
            "store1": store1,
            "store2": store2,
            "mon1": mon1,
        }
    leftovers = nspawn_hosts.leftovers(workdir)
    assert not leftovers, f"teardown left resources behind: {leftovers}"
