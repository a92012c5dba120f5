"""The daemon over real HTTP on loopback, serving synthetic slides."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import Daemon, http_get
from tiled.readers import open_slide
from tiled.synthetic import write_slide

# Mean absolute difference allowed between a tile tiled re-encoded at JPEG
# quality 90 and the same area computed from the source pixels.
JPEG_MEAN_TOLERANCE = 3.0


@pytest.fixture(scope="module")
def daemon(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("daemon")
    served = base / "slides"
    shutil.copytree(synthetic_root, served)
    outside = base / "outside"
    outside.mkdir()
    write_slide(outside / "secret.tif", 300, 200, downsamples=(1,))
    os.symlink(outside / "secret.tif", served / "escape.tif")
    os.symlink(served / "lossless.tif", served / "inside-link.tif")
    instance = Daemon([served], base / "store").start()
    yield instance
    instance.stop()


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def tile_url(slide_id: str, z: int, col: int, row: int, ext: str = "jpeg") -> str:
    return f"/slides/{slide_id}_files/{z}/{col}_{row}.{ext}"


def test_slide_list(daemon):
    slides = {s["name"]: s for s in daemon.get_json("/slides")["slides"]}
    assert slides["odd.svs"]["width"] == 4875
    assert slides["odd.svs"]["height"] == 4071
    assert slides["odd.svs"]["format"] == "aperio"
    assert slides["lossless.tif"]["format"] == "generic-tiff"
    assert re.fullmatch(r"[a-z2-7]{16}", slides["odd.svs"]["id"])


def test_symlink_leaving_root_is_not_listed(daemon):
    names = {s["name"] for s in daemon.get_json("/slides")["slides"]}
    assert "escape.tif" not in names
    assert "inside-link.tif" in names


def test_dzi_matches_level_zero(daemon):
    slide_id = daemon.slide_id("odd.svs")
    status, headers, body = daemon.get(f"/slides/{slide_id}.dzi")
    assert status == 200
    assert headers["Content-Type"].startswith("application/xml")
    text = body.decode()
    assert 'TileSize="256"' in text
    assert 'Overlap="0"' in text
    assert '<Size Width="4875" Height="4071"/>' in text


def test_slide_metadata_withholds_patient_fields(daemon):
    slide_id = daemon.slide_id("odd.svs")
    meta = daemon.get_json(f"/slides/{slide_id}")
    assert meta["mpp"] == [0.25, 0.25]
    assert meta["deepzoom"]["level_count"] == 14
    text = json.dumps(meta)
    assert "DOE" not in text
    assert "jdoe" not in text
    assert "Filename" not in text


def test_edge_tiles_have_exact_sizes(daemon):
    slide_id = daemon.slide_id("odd.svs")
    for z, col, row, size in [
        (13, 19, 15, (11, 231)),
        (13, 0, 0, (256, 256)),
        (12, 9, 7, (2438 - 9 * 256, 2036 - 7 * 256)),
        (0, 0, 0, (1, 1)),
        (1, 0, 0, (2, 1)),
    ]:
        status, _, body = daemon.get(tile_url(slide_id, z, col, row))
        assert status == 200, body
        image = Image.open(io.BytesIO(body))
        assert image.size == size, (z, col, row)


def test_interior_tile_passes_through(daemon, synthetic_root):
    slide_id = daemon.slide_id("odd.svs")
    with open_slide(synthetic_root / "odd.svs") as reader:
        stored = reader.read_tile(0, 5, 4)
        source_pixels = reader.read_tile_pixels(0, 5, 4)
    status, headers, body = daemon.get(tile_url(slide_id, 13, 5, 4))
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert body == stored.data
    assert np.array_equal(decode(body), source_pixels)


def test_missing_level_is_area_average(daemon, synthetic_root):
    slide_id = daemon.slide_id("odd.svs")
    full = tifffile.imread(synthetic_root / "odd.svs", level=0)
    status, _, body = daemon.get(tile_url(slide_id, 12, 2, 3))
    assert status == 200
    region = full[3 * 512 : 4 * 512, 2 * 512 : 3 * 512].astype(np.float64)
    expected = region.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    difference = np.abs(decode(body).astype(np.float64) - expected)
    assert difference.mean() < JPEG_MEAN_TOLERANCE


def test_lossless_source_png_is_exact(daemon, synthetic_root):
    slide_id = daemon.slide_id("lossless.tif")
    full = tifffile.imread(synthetic_root / "lossless.tif", level=0)
    status, headers, body = daemon.get(tile_url(slide_id, 11, 5, 4, "png"))
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    pixels = decode(body)
    assert pixels.shape == (1100 - 4 * 256, 1500 - 5 * 256, 3)
    assert np.array_equal(pixels, full[4 * 256 :, 5 * 256 :])
    status, headers, body = daemon.get(tile_url(slide_id, 11, 1, 1))
    assert headers["Content-Type"] == "image/jpeg"
    difference = np.abs(decode(body).astype(int) - full[256:512, 256:512])
    assert difference.mean() < JPEG_MEAN_TOLERANCE


def test_absent_tile_renders_background(daemon, synthetic_root):
    slide_id = daemon.slide_id("sparse.tif")
    with open_slide(synthetic_root / "sparse.tif") as reader:
        assert reader.read_tile(0, 1, 0) is None
        present = reader.read_tile(0, 0, 0)
    # Tile index 1 of level 0 is absent (only every 37th is stored).
    status, headers, body = daemon.get(tile_url(slide_id, 15, 1, 0))
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert len(body) > 0
    pixels = decode(body)
    assert pixels.shape == (256, 256, 3)
    assert pixels.min() >= 250
    status, _, body = daemon.get(tile_url(slide_id, 15, 0, 0))
    assert status == 200
    assert body == present.data


def test_conditional_request_and_head(daemon):
    slide_id = daemon.slide_id("odd.svs")
    url = tile_url(slide_id, 13, 3, 3)
    status, headers, body = daemon.get(url)
    etag = headers["ETag"]
    assert etag.startswith('"')
    assert not etag.startswith("W/")
    assert "max-age" in headers["Cache-Control"]
    status, headers, body = daemon.get(url, {"If-None-Match": etag})
    assert status == 304
    assert body == b""
    status, headers, body = daemon.get(url, {"If-None-Match": '"other", ' + etag})
    assert status == 304
    status, headers, body = daemon.get(url, method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["Content-Length"]) > 0


def test_cors_headers(daemon):
    slide_id = daemon.slide_id("odd.svs")
    status, headers, _ = daemon.get(
        tile_url(slide_id, 13, 0, 0), {"Origin": "https://viewer.example"}
    )
    assert headers["Access-Control-Allow-Origin"] == "*"
    status, headers, _ = daemon.get(tile_url(slide_id, 13, 0, 0), method="OPTIONS")
    assert status == 204
    assert "GET" in headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/slides/nosuchslide0000000", 404),
        ("/slides/nosuchslide0000000.dzi", 404),
        ("/slides/{id}_files/99/0_0.jpeg", 404),
        ("/slides/{id}_files/13/20_0.jpeg", 404),
        ("/slides/{id}_files/13/0_0.gif", 400),
        ("/slides/{id}_files/13/-1_0.jpeg", 400),
        ("/slides/{id}_files/13/0_0.jpeg/extra", 400),
        ("/slides/{id}_files/13/99999999999_0.jpeg", 400),
        ("/slides/..%2F..%2Fetc%2Fpasswd", 404),
        ("/slides/%2Fetc%2Fpasswd.dzi", 404),
        ("/slides/..%252F..%252Fetc%252Fpasswd_files/0/0_0.jpeg", 404),
        ("/static/..%2F..%2Fpyproject.toml", 404),
        ("/static/../../etc/passwd", 404),
        ("/nothing-here", 404),
    ],
)
def test_bad_requests_get_json_errors(daemon, path, status):
    slide_id = daemon.slide_id("odd.svs")
    got, headers, body = daemon.get(path.replace("{id}", slide_id))
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    error = json.loads(body)
    assert error["status"] == status
    assert error["message"]
    assert "/tmp" not in body.decode()
    assert "Traceback" not in body.decode()


def test_post_is_rejected(daemon):
    status, headers, body = daemon.get("/slides", method="POST")
    assert status == 405
    assert json.loads(body)["status"] == 405


def test_concurrent_first_requests_make_tile_once(daemon):
    slide_id = daemon.slide_id("odd.svs")
    url = daemon.url + tile_url(slide_id, 10, 1, 1)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: http_get(url), range(32)))
    bodies = {body for status, _, body in results}
    assert {status for status, _, _ in results} == {200}
    assert len(bodies) == 1


def test_metrics_count_tiles(daemon):
    slide_id = daemon.slide_id("odd.svs")
    daemon.get(tile_url(slide_id, 13, 1, 1))
    daemon.get(tile_url(slide_id, 13, 1, 1))
    status, headers, body = daemon.get("/metrics")
    assert status == 200
    text = body.decode()
    assert "tiled_tiles_served_total{" in text
    assert 'cache="hit"' in text
    assert "tiled_store_size_bytes" in text
    assert slide_id not in text


def test_viewer_page_and_vendored_openseadragon(daemon):
    status, headers, body = daemon.get("/")
    assert status == 200
    assert b"openseadragon.min.js" in body
    assert b"//cdn" not in body
    status, _, body = daemon.get("/static/openseadragon/openseadragon.min.js")
    assert status == 200
    assert len(body) > 100_000
    status, _, body = daemon.get("/static/openseadragon/LICENSE.txt")
    assert status == 200


def test_tiles_survive_restart(daemon, tmp_path):
    slide_id = daemon.slide_id("odd.svs")
    url = tile_url(slide_id, 11, 1, 1)
    _, _, first = daemon.get(url)
    daemon.stop()
    daemon.start()
    _, _, second = daemon.get(url)
    assert first == second
    _, _, body = daemon.get("/metrics")
    hits = re.search(rb'tiled_store_reads_total\{result="hit"\} ([0-9.e+]+)', body)
    assert hits and float(hits[1]) >= 1


def test_slide_list_pages(daemon):
    everything = daemon.get_json("/slides")
    assert everything["total"] == len(everything["slides"])
    page = daemon.get_json("/slides?offset=1&limit=2")
    assert page["offset"] == 1
    assert page["limit"] == 2
    assert [s["id"] for s in page["slides"]] == [
        s["id"] for s in everything["slides"][1:3]
    ]
    status, _, body = daemon.get("/slides?limit=-3")
    assert status == 400
    assert b"limit must be an integer" in body


def test_ingested_slides_listed_without_opening(make_daemon, tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    write_slide(root / "a.tif", 600, 400, downsamples=(1,))
    first = make_daemon([root])
    assert first.get_json("/slides")["slides"][0]["width"] == 600
    first.stop()
    # Restarted on the same store, the list comes from the stored record.
    second = Daemon([root], first.store).start()
    try:
        slide = second.get_json("/slides")["slides"][0]
        assert slide["width"] == 600
        _, _, body = second.get("/metrics")
        assert b"tiled_open_slides 0.0" in body
    finally:
        second.stop()


def test_truncated_slide_gives_422(make_daemon, synthetic_root, tmp_path):
    root = tmp_path / "truncated"
    root.mkdir()
    data = (synthetic_root / "odd.svs").read_bytes()
    (root / "cut.svs").write_bytes(data[:5000])
    daemon = make_daemon([root])
    slide_id = daemon.slide_id("cut.svs")
    for path in (
        tile_url(slide_id, 13, 5, 5),
        tile_url(slide_id, 13, 0, 0),
        f"/slides/{slide_id}/region?x=1280&y=1280&width=256&height=256",
    ):
        status, headers, body = daemon.get(path)
        assert status == 422, (path, body)
        assert json.loads(body)["error"] == "corrupt_slide"
    status, _, _ = daemon.get("/healthz")
    assert status == 200


def test_id_secret_keys_slide_ids(make_daemon, synthetic_root, tmp_path):
    from tiled.slides import slide_id_for

    daemon = make_daemon(
        [synthetic_root], extra_config={"slides": {"id_secret": "s3cret"}}
    )
    slide_id = daemon.slide_id("odd.svs")
    assert slide_id != slide_id_for("odd.svs")
    assert slide_id == slide_id_for("odd.svs", "s3cret")
    assert re.fullmatch(r"[a-z2-7]{16}", slide_id)
    _, _, body = daemon.get(f"/slides/{slide_id}")
    assert b"s3cret" not in body
    config = tmp_path / "ingest.yaml"
    config.write_text("slides:\n  id_secret: s3cret\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiled",
            "ingest",
            str(synthetic_root / "odd.svs"),
            "--root",
            str(synthetic_root),
            "--config",
            str(config),
            "--store",
            str(tmp_path / "s"),
            "--quiet",
            "--tile-size",
            "4096",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == slide_id
