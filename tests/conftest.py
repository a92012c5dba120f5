"""Shared fixtures: sample slides, synthetic slides and live daemons on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tiled.synthetic import write_slide

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("TILED_SAMPLES", REPO.parent / "shared" / "slides"))


def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample slides not found at {SAMPLES} (set TILED_SAMPLES)")
    return SAMPLES


def sample(relative: str) -> Path:
    path = samples_dir() / relative
    if not path.exists():
        pytest.skip(f"sample {relative} is absent")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 60,
) -> tuple[int, dict, bytes]:
    """Fetch a URL; return (status, headers, body) also for error statuses."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class Daemon:
    """A ``tiled serve`` subprocess on a loopback port."""

    def __init__(
        self,
        roots: list[Path],
        store: Path,
        extra_config: dict | None = None,
        workers: int = 1,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = store
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "workers": workers},
            # Synthetic and public slides only, so tests look slides up by name.
            "slides": {
                "roots": [str(root) for root in roots],
                "show_file_names": True,
            },
            "store": {"path": str(store)},
        }
        for section, values in (extra_config or {}).items():
            config.setdefault(section, {}).update(values)
        self.config_path = store.parent / f"tiled-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = store.parent / f"tiled-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Daemon:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        env = dict(os.environ)
        env.pop("TILED_CONFIG", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tiled", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                status, _, _ = http_get(self.url + "/healthz", timeout=2)
                if status == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not start: {self.log_path.read_text()}")

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict, bytes]:
        return http_get(self.url + path, headers, method)

    def get_json(self, path: str) -> object:
        status, _, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def slide_id(self, name: str) -> str:
        for slide in self.get_json("/slides")["slides"]:
            if slide["name"] == name:
                return slide["id"]
        raise KeyError(name)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator:
    daemons: list[Daemon] = []

    def start(roots: list[Path], **options) -> Daemon:
        store = tmp_path / f"store-{len(daemons)}"
        daemon = Daemon(roots, store, **options).start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of synthetic slides with odd geometry, made once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    write_slide(
        root / "odd.svs", 4875, 4071, aperio=True, label_text="DOE^JANE\nMRN 0012345"
    )
    write_slide(
        root / "lossless.tif", 1500, 1100, compression="zlib", downsamples=(1, 4)
    )
    # Sparse: only every 37th level-0 tile is stored; the rest are absent.
    write_slide(root / "sparse.tif", 30000, 26319, downsamples=(1,), sparse_every=37)
    return root
