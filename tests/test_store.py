"""The LMDB store: generations, map growth, a full disk and a killed ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiled.codecs import Codec, Tile
from tiled.config import Settings
from tiled.errors import StoreFull
from tiled.ingest import count_tiles, entry_for, ingest_slide
from tiled.slides import ReaderCache, SlidePyramid
from tiled.store import Store, tile_key
from tiled.synthetic import write_slide

RECORD = {"id": "slide1", "source": {"path": "a.svs", "size": 1, "mtime_ns": 1}}


def jpeg_tile(size: int = 1000) -> Tile:
    return Tile(Codec.JPEG, 256, 256, os.urandom(size))


def test_register_keeps_generation_for_same_source(tmp_path):
    store = Store(tmp_path / "store")
    first = store.register_slide(RECORD)
    again = store.register_slide(RECORD)
    assert first["generation"] == again["generation"] == 1


def test_changed_source_drops_old_tiles(tmp_path):
    store = Store(tmp_path / "store")
    old = store.register_slide(RECORD)
    store.put_tiles(
        [(tile_key("slide1", old["generation"], "v", 0, 0, 0), jpeg_tile())]
    )
    changed = dict(RECORD, source={"path": "a.svs", "size": 2, "mtime_ns": 2})
    new = store.register_slide(changed)
    assert new["generation"] == 2
    assert store.count_tiles("slide1") == 0


def test_map_grows_when_full(tmp_path):
    store = Store(tmp_path / "store", map_size=1 << 20, max_map_size=1 << 30)
    record = store.register_slide(RECORD)
    for row in range(40):
        store.put_tiles(
            [
                (
                    tile_key("slide1", record["generation"], "v", 0, col, row),
                    jpeg_tile(20_000),
                )
                for col in range(10)
            ]
        )
    usage = store.usage()
    assert usage["map_size"] > 1 << 20
    assert store.count_tiles("slide1") == 400


def test_map_ceiling_gives_store_full(tmp_path):
    store = Store(tmp_path / "store", map_size=1 << 20, max_map_size=2 << 20)
    record = store.register_slide(RECORD)
    kept = tile_key("slide1", record["generation"], "v", 0, 0, 0)
    store.put_tiles([(kept, jpeg_tile())])
    with pytest.raises(StoreFull, match="max_map_size_bytes"):
        for row in range(100):
            store.put_tiles(
                [
                    (
                        tile_key("slide1", record["generation"], "v", 1, col, row),
                        jpeg_tile(50_000),
                    )
                    for col in range(4)
                ]
            )
    assert store.get_tile("slide1", record["generation"], "v", 0, 0, 0) is not None


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs, so writes hit a real ENOSPC."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_keeps_store_readable(small_disk):
    store = Store(small_disk / "store", map_size=64 << 20)
    record = store.register_slide(RECORD)
    generation = record["generation"]
    first = tile_key("slide1", generation, "v", 0, 0, 0)
    store.put_tiles([(first, jpeg_tile(10_000))])
    with pytest.raises(StoreFull, match="disk is full"):
        for row in range(1, 200):
            store.put_tiles(
                [
                    (
                        tile_key("slide1", generation, "v", 0, col, row),
                        jpeg_tile(20_000),
                    )
                    for col in range(8)
                ]
            )
    assert store.get_tile("slide1", generation, "v", 0, 0, 0) is not None
    store.close()
    reopened = Store(small_disk / "store", map_size=64 << 20, readonly=True)
    assert reopened.get_slide("slide1")["generation"] == generation
    assert reopened.get_tile("slide1", generation, "v", 0, 0, 0) is not None


def test_ingest_is_complete_and_resumable(tmp_path):
    slide = write_slide(tmp_path / "s.tif", 1300, 900, downsamples=(1, 4))
    store = Store(tmp_path / "store")
    settings = Settings()
    entry = entry_for(slide, [])
    result = ingest_slide(entry, store, settings)
    assert result["made"] == result["total"]
    record = store.get_slide(entry.id)
    assert record["complete"] == ["dz256o0q90"]
    assert store.count_tiles(entry.id) == result["total"]
    again = ingest_slide(entry, store, settings)
    assert again["made"] == 0
    assert again["skipped"] == result["total"]


def _staged_tiles(store_path: Path, slide_id: str) -> int:
    store = Store(store_path, readonly=True)
    try:
        return store.count_tiles(slide_id)
    finally:
        store.close()


def test_sigkill_during_ingest_leaves_slide_absent_or_complete(tmp_path):
    slide = write_slide(
        tmp_path / "big.tif", 6000, 5000, downsamples=(1,), compression="zlib"
    )
    store_path = tmp_path / "store"
    entry = entry_for(slide, [])
    command = [
        sys.executable,
        "-m",
        "tiled",
        "ingest",
        str(slide),
        "--store",
        str(store_path),
        "--quiet",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    staged = 0
    while time.monotonic() < deadline and process.poll() is None:
        if (store_path / "data.mdb").exists():
            staged = _staged_tiles(store_path, entry.id)
            if staged > 0:
                break
        time.sleep(0.05)
    assert process.poll() is None, "ingest finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert staged > 0

    store = Store(store_path)
    record = store.get_slide(entry.id)
    if record is None:
        # Killed mid-ingest: the staged generation waits for the rerun.
        assert store.get_ingest(entry.id) is not None
    else:
        # The kill landed after the final commit.
        assert record["complete"] == ["dz256o0q90"]
    store.close()

    rerun = subprocess.run(command, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    store = Store(store_path)
    record = store.get_slide(entry.id)
    assert record["complete"] == ["dz256o0q90"]
    readers = ReaderCache(1)
    pyramid = SlidePyramid(entry, readers.get(entry), store, Settings(), readers)
    assert store.count_tiles(entry.id, record["generation"]) == count_tiles(pyramid)
    assert store.get_ingest(entry.id) is None
    readers.close()
