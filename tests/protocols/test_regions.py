"""Region, thumbnail and tile batch API, and agreement between all protocols."""

from __future__ import annotations

import email
import io

import numpy as np
import pytest
import tifffile
from conftest import JPEG_SIZE, LOSSLESS_SIZE, make_settings, pattern_pixels
from PIL import Image


async def fetch_npy(client, url: str) -> np.ndarray:
    response = await client.get(url)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/x-npy"
    return np.load(io.BytesIO(await response.read()), allow_pickle=False)


async def fetch_image(client, url: str) -> np.ndarray:
    response = await client.get(url)
    assert response.status == 200, await response.text()
    return np.asarray(Image.open(io.BytesIO(await response.read())).convert("RGB"))


async def test_region_level0_is_exact(client):
    url = "/slides/pattern/region?x=10&y=20&width=100&height=50&format=npy"
    pixels = await fetch_npy(client, url)
    assert np.array_equal(pixels, pattern_pixels(*LOSSLESS_SIZE)[20:70, 10:110])


async def test_region_outside_is_white(client):
    url = "/slides/pattern/region?x=650&y=-10&width=100&height=30&format=npy"
    pixels = await fetch_npy(client, url)
    assert pixels.shape == (30, 100, 3)
    assert (pixels[:10] == 255).all()
    assert (pixels[:, 50:] == 255).all()
    expected = pattern_pixels(*LOSSLESS_SIZE)[0:20, 650:700]
    assert np.array_equal(pixels[10:, :50], expected)


async def test_region_at_mpp(client):
    # The pattern slide has 0.5 um pixels, so mpp=1 is a 2x downsample.
    by_mpp = await fetch_npy(
        client, "/slides/pattern/region?x=0&y=0&width=64&height=32&mpp=1&format=npy"
    )
    by_level = await fetch_npy(
        client, "/slides/pattern/region?x=0&y=0&width=64&height=32&level=1&format=npy"
    )
    assert np.array_equal(by_mpp, by_level)
    response = await client.get("/slides/pattern/region?x=0&y=0&width=64&height=32")
    assert response.headers["Content-Type"] == "image/jpeg"


async def test_thumbnail_fits(client):
    pixels = await fetch_image(
        client, "/slides/tissue/thumbnail?max_size=300&format=png"
    )
    assert pixels.shape == (220, 300, 3)


@pytest.mark.parametrize(
    "query",
    [
        "x=0&y=0&width=0&height=10",
        "x=0&y=0&width=10",
        "x=a&y=0&width=10&height=10",
        "x=0&y=0&width=9000&height=10",
        "x=0&y=0&width=8000&height=8000",
        "x=0&y=0&width=10&height=10&level=99",
        "x=0&y=0&width=10&height=10&mpp=0",
        "x=0&y=0&width=10&height=10&mpp=1&level=1",
        "x=0&y=0&width=10&height=10&format=tiff",
    ],
)
async def test_region_rejects(client, query):
    response = await client.get(f"/slides/tissue/region?{query}")
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "bad_request"
    assert body["message"]


async def test_region_far_zoomed_out_stays_bounded(client):
    # 8000 x 2000 output pixels covering 2**11 times the slide: the read
    # level is the coarsest, so this returns quickly with little memory.
    url = "/slides/tissue/region?x=0&y=0&width=8000&height=2000&level=11&format=png"
    pixels = await fetch_image(client, url)
    assert pixels.shape == (2000, 8000, 3)


async def test_tile_batch(client):
    tiles = [[11, 0, 0], {"level": 10, "col": 2, "row": 2}, [0, 0, 0]]
    response = await client.post("/slides/tissue/tiles", json={"tiles": tiles})
    assert response.status == 200
    body = await response.read()
    header = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(header + body)
    parts = message.get_payload()
    assert [part["X-Tile-Address"] for part in parts] == ["11/0/0", "10/2/2", "0/0/0"]
    single = await client.get("/slides/tissue_files/11/0_0.jpeg")
    assert parts[0].get_payload(decode=True) == await single.read()
    edge = Image.open(io.BytesIO(parts[1].get_payload(decode=True)))
    # DeepZoom level 10 is 750 x 550, so tile (2, 2) is 238 x 38.
    assert edge.size == (750 - 512, 550 - 512)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"tiles": []}, 400),
        ({"tiles": [[1, 2]]}, 400),
        ({"tiles": [[11, 99, 0]]}, 404),
        ({"tiles": [[11, 0, 0]] * 257}, 400),
        ({"tiles": [[11, 0, 0]], "format": "gif"}, 400),
        ([1, 2, 3], 400),
    ],
)
async def test_tile_batch_rejects(client, body, status):
    response = await client.post("/slides/tissue/tiles", json=body)
    assert response.status == status
    assert (await response.json())["message"]


async def test_protocols_agree(client):
    """One area through DeepZoom, IIIF, DICOMweb and the region API."""
    # Level-0 rectangle 512,256 to 768,512 of the JPEG slide: DeepZoom tile
    # (2, 1) of the full level, frame 9 of the DICOM level-0 instance.
    deepzoom = await fetch_image(client, "/slides/tissue_files/11/2_1.jpeg")
    iiif = await fetch_image(client, "/iiif/3/tissue/512,256,256,256/max/0/default.png")
    region = await fetch_npy(
        client, "/slides/tissue/region?x=512&y=256&width=256&height=256&format=npy"
    )
    studies = await (await client.get("/dicomweb/studies")).json(content_type=None)
    uids = []
    for study in studies:
        study_uid = study["0020000D"]["Value"][0]
        url = f"/dicomweb/studies/{study_uid}/instances?InstanceNumber=1"
        instance = (await (await client.get(url)).json(content_type=None))[0]
        if instance["00480006"]["Value"][0] == JPEG_SIZE[0]:
            uids = [study_uid, instance["0020000E"]["Value"][0]]
            uids.append(instance["00080018"]["Value"][0])
    study_uid, series_uid, instance_uid = uids
    frame_url = (
        f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{instance_uid}"
        "/frames/9"
    )
    response = await client.get(
        frame_url, headers={"Accept": 'multipart/related; type="image/jpeg"'}
    )
    body = await response.read()
    header = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    (part,) = email.message_from_bytes(header + body).get_payload()
    dicom = np.asarray(Image.open(io.BytesIO(part.get_payload(decode=True))))
    # Level 2 of the region API and IIIF scale factor 4, against each other.
    coarse_region = await fetch_npy(
        client,
        "/slides/tissue/region?x=512&y=256&width=64&height=64&level=2&format=npy",
    )
    coarse_iiif = await fetch_image(
        client, "/iiif/3/tissue/512,256,256,256/64,64/0/default.png"
    )
    # Stored JPEG decoded three ways; only the codec may differ, and it does
    # not here because every path passes or decodes the same tile.
    assert np.array_equal(deepzoom, region)
    assert np.array_equal(deepzoom, iiif)
    assert np.abs(deepzoom.astype(int) - dicom.astype(int)).max() <= 2
    assert np.array_equal(coarse_region, coarse_iiif)


async def test_npy_region_keeps_16_bit_samples(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from tiled.server import create_app

    y, x = np.mgrid[0:300, 0:400]
    pixels = ((x * 100 + y * 7) % 65536).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "deep.tif",
        pixels,
        tile=(128, 128),
        compression="zlib",
        photometric="minisblack",
        metadata=None,
    )
    settings = make_settings(tmp_path, tmp_path / "store", {"deep": "deep.tif"})
    async with TestClient(TestServer(create_app(settings))) as client:
        url = "/slides/deep/region?x=10&y=20&width=100&height=50&format=npy"
        exact = await fetch_npy(client, url)
        assert exact.dtype == np.uint16
        assert exact.shape[:2] == (50, 100)
        assert np.array_equal(exact.reshape(50, 100), pixels[20:70, 10:110])
        url = "/slides/deep/region?x=0&y=0&width=100&height=75&level=2&format=npy"
        halved = await fetch_npy(client, url)
        assert halved.dtype == np.uint16
        assert halved.shape[:2] == (75, 100)
