"""Fixtures of the protocol tests: synthetic slides and a daemon serving them.

``client`` serves through aiohttp's test client in the test's event loop.
``live_server`` runs ``tiled serve`` as a process on a loopback port, for
blocking clients (dicomweb-client, wsidicom, the IIIF validator).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from aiohttp.test_utils import TestClient, TestServer

from tiled.config import load_settings
from tiled.server import create_app
from tiled.synthetic import write_slide

REPO_ROOT = Path(__file__).resolve().parents[2]
# JPEG slide: 1500 x 1100 with 256-pixel tiles, so every level has edge tiles.
JPEG_SLIDE = "tissue.tif"
JPEG_SIZE = (1500, 1100)
# Lossless slide of a known pattern, to compare pixels exactly.
LOSSLESS_SLIDE = "pattern.tif"
LOSSLESS_SIZE = (700, 500)


def pattern_pixels(width: int, height: int) -> np.ndarray:
    """Return a smooth RGB pattern whose every pixel differs from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [
            (x * 255 // max(1, width - 1)),
            (y * 255 // max(1, height - 1)),
            (x + y) % 256,
        ],
        axis=2,
    ).astype(np.uint8)


def write_pattern_slide(path: Path, pixels: np.ndarray, tile: int = 256) -> None:
    """Write pixels as a lossless, tiled, single-level TIFF with a resolution."""
    pixels_per_cm = 10000.0 / 0.5
    tifffile.imwrite(
        path,
        pixels,
        tile=(tile, tile),
        compression="zlib",
        photometric="rgb",
        resolution=(pixels_per_cm, pixels_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
    )


@pytest.fixture(scope="session")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    write_slide(root / JPEG_SLIDE, *JPEG_SIZE, tile_size=256, downsamples=(1, 4))
    write_pattern_slide(root / LOSSLESS_SLIDE, pattern_pixels(*LOSSLESS_SIZE))
    return root


def make_settings(root: Path, store: Path, aliases: dict[str, str] | None = None):
    overrides = {
        "slides": {
            "roots": [str(root)],
            "aliases": aliases or {"tissue": JPEG_SLIDE, "pattern": LOSSLESS_SLIDE},
        },
        "store": {"path": str(store)},
    }
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture
async def client(slide_root: Path, tmp_path: Path) -> AsyncIterator[TestClient]:
    app = create_app(make_settings(slide_root, tmp_path / "store"))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A ``tiled serve`` process on 127.0.0.1."""

    def __init__(self, root: Path, store: Path, aliases: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        store.parent.mkdir(parents=True, exist_ok=True)
        config = store.parent / "tiled.yaml"
        lines = [
            "slides:",
            f"  roots: [{str(root)!r}]",
            "  aliases:",
            *(f"    {name!r}: {path!r}" for name, path in aliases.items()),
            "store:",
            f"  path: {str(store)!r}",
        ]
        config.write_text("\n".join(lines) + "\n")
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("TILED_")
        }
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "tiled", "serve", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(self.port),
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"tiled serve exited: {error[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("tiled serve did not answer /healthz within 30 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture(scope="session")
def live_server(
    slide_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("live") / "store"
    server = LiveServer(
        slide_root, store, {"tissue": JPEG_SLIDE, "pattern": LOSSLESS_SLIDE}
    )
    yield server
    server.stop()
