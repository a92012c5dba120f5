"""IIIF Image API: parsing, limits, tile pass-through and the official validator."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    JPEG_SIZE,
    LOSSLESS_SIZE,
    REPO_ROOT,
    LiveServer,
    pattern_pixels,
    write_pattern_slide,
)
from PIL import Image

from tiled.config import LimitsSettings
from tiled.errors import BadRequest
from tiled.iiif import parse_region, parse_rotation, parse_size

LIMITS = LimitsSettings(max_width=4000, max_height=3000, max_area=6_000_000)
VALIDATOR_ID = "67352ccc-d1b0-11e1-89ae-279075081939"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("full", (0, 0, 1000, 600)),
        ("square", (200, 0, 600, 600)),
        ("10,20,30,40", (10, 20, 30, 40)),
        ("900,500,300,300", (900, 500, 100, 100)),
        ("pct:10,50,20,50", (100, 300, 200, 300)),
    ],
)
def test_parse_region_forms(text, expected):
    assert parse_region(text, 1000, 600) == expected


@pytest.mark.parametrize(
    "text",
    ["0,0,0,10", "1000,0,10,10", "0,600,5,5", "a,b,c,d", "pct:1,2,3", "-1,0,5,5"],
)
def test_parse_region_rejects(text):
    with pytest.raises(BadRequest):
        parse_region(text, 1000, 600)


@pytest.mark.parametrize(
    ("text", "version", "expected"),
    [
        ("max", "3", (1000, 600)),
        ("500,", "3", (500, 300)),
        (",300", "3", (500, 300)),
        ("pct:50", "3", (500, 300)),
        ("!500,500", "3", (500, 300)),
        ("100,100", "3", (100, 100)),
        ("^2000,", "3", (2000, 1200)),
        ("^!4000,1500", "3", (2500, 1500)),
        ("^max", "3", (3162, 1897)),
        ("full", "2", (1000, 600)),
        ("2000,", "2", (2000, 1200)),
    ],
)
def test_parse_size_forms(text, version, expected):
    assert parse_size(text, 1000, 600, version, LIMITS) == expected


def test_parse_size_max_fits_limits():
    assert parse_size("max", 8000, 1000, "3", LIMITS) == (4000, 500)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("2000,", "3"),
        ("!2000,2000", "3"),
        ("pct:101", "3"),
        ("full", "3"),
        ("0,", "3"),
        ("^5000,", "3"),
        ("^3000,3000", "3"),
        ("4001,10", "2"),
        ("999999999999,", "2"),
        ("abc", "3"),
    ],
)
def test_parse_size_rejects(text, version):
    with pytest.raises(BadRequest):
        parse_size(text, 1000, 600, version, LIMITS)


def test_parse_rotation():
    assert parse_rotation("!90") == (True, 90.0)
    assert parse_rotation("22.5") == (False, 22.5)
    for text in ("361", "-5", "abc", "!!0"):
        with pytest.raises(BadRequest):
            parse_rotation(text)


async def test_info_json_v3(client):
    response = await client.get("/iiif/3/tissue/info.json")
    assert response.status == 200
    info = await response.json()
    assert info["type"] == "ImageService3"
    assert info["profile"] == "level2"
    assert info["id"].endswith("/iiif/3/tissue")
    assert (info["width"], info["height"]) == JPEG_SIZE
    assert info["tiles"][0]["width"] == 256
    assert info["tiles"][0]["scaleFactors"] == [2**k for k in range(12)]
    assert info["maxArea"] == LimitsSettings().max_area
    assert {"width": 750, "height": 550} in info["sizes"]
    assert 'rel="profile"' in response.headers["Link"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_info_json_v2_and_jsonld(client):
    response = await client.get(
        "/iiif/2/tissue/info.json", headers={"Accept": "application/ld+json"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/ld+json")
    info = await response.json(content_type=None)
    assert info["@context"] == "http://iiif.io/api/image/2/context.json"
    assert info["profile"][0] == "http://iiif.io/api/image/2/level2.json"
    assert "maxWidth" in info["profile"][1]


async def test_base_uri_redirects(client):
    response = await client.get("/iiif/3/tissue", allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/iiif/3/tissue/info.json"


async def test_tile_passes_stored_jpeg(client):
    # A full-resolution tile of a JPEG slide is the stored tile, byte for byte.
    tile = await client.get("/slides/tissue_files/11/1_0.jpeg")
    iiif = await client.get("/iiif/3/tissue/256,0,256,256/256,256/0/default.jpg")
    assert iiif.status == 200
    assert await iiif.read() == await tile.read()


async def test_edge_tile_size(client):
    # Scale factor 4 tile (1, 1): level-0 region 1024,1024 to the image edge.
    width, height = JPEG_SIZE
    region_w, region_h = width - 1024, height - 1024
    out = ((region_w + 3) // 4, (region_h + 3) // 4)
    region = f"1024,1024,{region_w},{region_h}"
    response = await client.get(
        f"/iiif/3/tissue/{region}/{out[0]},{out[1]}/0/default.jpg"
    )
    assert response.status == 200
    image = Image.open(io.BytesIO(await response.read()))
    assert image.size == out
    dz = await client.get("/slides/tissue_files/9/1_1.jpeg")
    assert await response.read() == await dz.read()


async def test_region_pixels_lossless(client):
    response = await client.get("/iiif/3/pattern/40,30,200,100/max/0/default.png")
    assert response.status == 200
    pixels = np.asarray(Image.open(io.BytesIO(await response.read())))
    expected = pattern_pixels(*LOSSLESS_SIZE)[30:130, 40:240]
    assert np.array_equal(pixels, expected)


async def test_rotation_and_mirror(client):
    base = "/iiif/3/pattern/0,0,100,50"
    plain = await client.get(f"{base}/max/0/default.png")
    turned = await client.get(f"{base}/max/90/default.png")
    mirrored = await client.get(f"{base}/max/!0/default.png")
    angled = await client.get(f"{base}/max/30/default.png")
    original = np.asarray(Image.open(io.BytesIO(await plain.read())))
    rotated = np.asarray(Image.open(io.BytesIO(await turned.read())))
    flipped = np.asarray(Image.open(io.BytesIO(await mirrored.read())))
    tilted = Image.open(io.BytesIO(await angled.read()))
    assert np.array_equal(rotated, np.rot90(original, k=-1))
    assert np.array_equal(flipped, original[:, ::-1])
    assert tilted.mode == "RGBA"
    assert tilted.getpixel((0, 0))[3] == 0


async def test_qualities_and_formats(client):
    gray = await client.get("/iiif/3/tissue/full/200,/0/gray.png")
    bitonal = await client.get("/iiif/3/tissue/full/200,/0/bitonal.png")
    webp = await client.get("/iiif/3/tissue/full/200,/0/color.webp")
    assert Image.open(io.BytesIO(await gray.read())).mode == "L"
    assert Image.open(io.BytesIO(await bitonal.read())).mode == "1"
    assert webp.headers["Content-Type"] == "image/webp"
    assert Image.open(io.BytesIO(await webp.read())).format == "WEBP"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("full/max/0/default.gif", 400),
        ("full/max/0/fancy.jpg", 400),
        ("full/max/400/default.jpg", 400),
        ("0,0,0,0/max/0/default.jpg", 400),
        ("99999,0,10,10/max/0/default.jpg", 400),
        ("full/99999,99999/0/default.jpg", 400),
        ("full/^8000,8000/0/default.jpg", 400),
        ("full/-5,/0/default.jpg", 400),
    ],
)
async def test_bad_requests_get_json(client, slide_root, path, status):
    response = await client.get(f"/iiif/3/tissue/{path}")
    assert response.status == status
    body = await response.json()
    assert body["error"] == "bad_request"
    assert str(slide_root) not in body["message"]


async def test_unknown_identifier_is_404(client):
    response = await client.get("/iiif/3/no-such-slide/info.json")
    assert response.status == 404


def validator_dir() -> Path:
    default = REPO_ROOT.parent / "shared" / "iiif-validator"
    return Path(os.environ.get("TILED_IIIF_VALIDATOR_DIR", default))


@pytest.fixture(scope="module")
def validator_server(tmp_path_factory):
    source = validator_dir() / f"{VALIDATOR_ID}.png"
    if not source.is_file():
        pytest.skip(f"the IIIF validator test image is not in {source.parent}")
    if shutil.which("iiif-validate.py") is None:
        pytest.skip("iiif-validator (PyPI) is not installed")
    root = tmp_path_factory.mktemp("validator-slides")
    pixels = np.asarray(Image.open(source).convert("RGB"))
    write_pattern_slide(root / "validator.tif", pixels)
    store = tmp_path_factory.mktemp("validator-store") / "store"
    server = LiveServer(root, store, {VALIDATOR_ID: "validator.tif"})
    yield server
    server.stop()


@pytest.mark.parametrize(("version", "prefix"), [("3.0", "iiif/3"), ("2.0", "iiif/2")])
def test_official_validator_level2(validator_server, version, prefix):
    command = [
        "iiif-validate.py",
        "-s", f"127.0.0.1:{validator_server.port}",
        "-p", prefix,
        "-i", VALIDATOR_ID,
        f"--version={version}",
        "--level", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "0 failures" in result.stderr


def test_official_validator_beyond_level2(validator_server):
    # Features info.json lists as extraFeatures; format_webp is left out
    # because iiif-validator 1.0.5 calls urllib.urlopen, which Python 3 lacks.
    tests = [
        "rot_full_non90",
        "rot_region_non90",
        "rot_mirror",
        "rot_mirror_180",
        "linkheader_canonical",
        "linkheader_profile",
    ]
    command = [
        "iiif-validate.py",
        "-s", f"127.0.0.1:{validator_server.port}",
        "-p", "iiif/3",
        "-i", VALIDATOR_ID,
        "--version=3.0",
    ]  # fmt: skip
    for name in tests:
        command += ["--test", name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
