"""Format readers on synthetic files made at test time.

Covers what the public samples lack: sparse DICOM, Aperio JPEG 2000 in
YCbCr (33003), RGB JPEG tiles with and without an Adobe APP14 marker, a
zero-length tile, strip-based TIFFs, resolution tags and OME-TIFF channels.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import simplejpeg
import tifffile
from PIL import Image

from tiled.codecs import decode_jpeg, has_adobe_marker
from tiled.errors import CorruptSlide, UnsupportedSlide
from tiled.readers import open_slide
from tiled.readers.tiff import ycbcr_to_rgb
from tiled.slides import slide_id_for
from tiled.synthetic import tissue_pixels, write_slide

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("wsidicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def frame_value(col: int, row: int) -> int:
    return (col * 40 + row * 20) % 200


def write_dicom(
    path: Path,
    width: int = 100,
    height: int = 80,
    tile: int = 32,
    present: set[int] | None = None,
    jpeg: bool = False,
    samples: int = 3,
    bits: int = 8,
    patient_name: str = "DOE^JANE",
) -> Path:
    """Write a one-level VL Whole Slide Microscopy instance with pydicom.

    Frame (col, row) is filled with ``frame_value(col, row)``. With
    ``present`` the instance is TILED_SPARSE and holds only those frame
    indices (row-major), with positions in per-frame functional groups.
    Patient and study fields hold fake identifying text.
    """
    cols, rows = math.ceil(width / tile), math.ceil(height / tile)
    positions = [(c, r) for r in range(rows) for c in range(cols)]
    if present is not None:
        positions = [p for i, p in enumerate(positions) if i in present]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_WHOLE_SLIDE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = VL_WHOLE_SLIDE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "SM"
    ds.PatientName = patient_name
    ds.PatientID = "MRN0012345"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC998877"
    ds.StudyID = "STUDY42"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.InstitutionName = "Princeton Plainsboro"
    ds.StudyDate = "20260102"
    ds.StudyTime = "101500"
    ds.SeriesDescription = "Biopsy of Jane Doe"
    ds.ContainerIdentifier = "BARCODE-7731"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.Rows = tile
    ds.Columns = tile
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFrames = len(positions)
    ds.DimensionOrganizationType = (
        "TILED_SPARSE" if present is not None else ("TILED_FULL")
    )
    ds.ImagedVolumeWidth = width * 0.00025
    ds.ImagedVolumeHeight = height * 0.00025
    ds.ImagedVolumeDepth = 0.001
    ds.NumberOfOpticalPaths = 1
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    optical_path.IlluminationColorCodeSequence = Sequence(
        [_code("R-102C0", "SRT", "Full Spectrum")]
    )
    optical_path.IlluminationTypeCodeSequence = Sequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    ds.OpticalPathSequence = Sequence([optical_path])
    measures = Dataset()
    measures.PixelSpacing = [0.00025, 0.00025]
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    if present is not None:
        per_frame = []
        for col, row in positions:
            position = Dataset()
            position.ColumnPositionInTotalImagePixelMatrix = col * tile + 1
            position.RowPositionInTotalImagePixelMatrix = row * tile + 1
            position.XOffsetInSlideCoordinateSystem = 0
            position.YOffsetInSlideCoordinateSystem = 0
            position.ZOffsetInSlideCoordinateSystem = 0
            frame = Dataset()
            frame.PlanePositionSlideSequence = Sequence([position])
            per_frame.append(frame)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    dtype = np.uint8 if bits == 8 else np.uint16
    frames = [
        np.full((tile, tile, samples), frame_value(col, row), dtype=dtype)
        for col, row in positions
    ]
    if jpeg:
        ds.PixelData = encapsulate(
            [
                simplejpeg.encode_jpeg(frame, quality=95, colorspace="RGB")
                for frame in frames
            ]
        )
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --- DICOM -----------------------------------------------------------------


def test_dicom_sparse_absent_frames_background(tmp_path):
    # Frames 0, 2 and 5 of a 4x3 grid are present; the rest are absent.
    path = write_dicom(tmp_path / "sparse.dcm", present={0, 2, 5})
    with open_slide(path) as reader:
        assert reader.format == "dicom"
        assert reader.mpp == pytest.approx((0.25, 0.25))
        region = reader.read_region(0, 0, 0, 100, 80)
    assert region[0, 0, 0] == frame_value(0, 0)
    assert region[0, 64, 0] == frame_value(2, 0)
    assert region[32, 32, 0] == frame_value(1, 1)
    assert region[0, 32, 0] == 255
    assert region[64, 0, 0] == 255


def _recompress(path: Path, syntax: str) -> None:
    """Re-encode every frame of a native RGB instance with another codec."""
    dataset = pydicom.dcmread(path)
    if syntax == "rle":
        dataset.compress(pydicom.uid.RLELossless)
    else:
        frames = dataset.pixel_array
        if syntax == "jpegls":
            encoded = [imagecodecs.jpegls_encode(frame, level=0) for frame in frames]
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
        else:
            encoded = [
                imagecodecs.jpeg2k_encode(
                    frame, level=0, reversible=True, codecformat="j2k"
                )
                for frame in frames
            ]
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
        dataset.PixelData = encapsulate(encoded)
        dataset["PixelData"].VR = "OB"
        dataset["PixelData"].is_undefined_length = True
    dataset.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "jpeg2000"])
def test_dicom_lossless_transfer_syntaxes(tmp_path, syntax):
    path = write_dicom(tmp_path / f"{syntax}.dcm")
    _recompress(path, syntax)
    with open_slide(path) as reader:
        assert reader.passthrough_codec is None
        assert not reader.is_lossy
        region = reader.read_region(0, 0, 0, 100, 80)
    for col, row in ((0, 0), (3, 2), (1, 2)):
        assert region[row * 32, col * 32, 0] == frame_value(col, row)


def test_dicom_jpeg_frames_pass_through(tmp_path):
    path = write_dicom(tmp_path / "jpeg.dcm", jpeg=True)
    with open_slide(path) as reader:
        assert reader.passthrough_codec == "jpeg"
        tile = reader.read_tile(0, 1, 1)
    pixels = decode_jpeg(tile.data)
    assert abs(int(pixels[5, 5, 0]) - frame_value(1, 1)) <= 2


def test_dicom_16bit_monochrome_kept(tmp_path):
    path = write_dicom(tmp_path / "mono16.dcm", samples=1, bits=16)
    with open_slide(path) as reader:
        assert reader.bits == 16
        assert reader.samples == 1
        pixels = reader.read_tile_pixels(0, 2, 1)
        display = reader.to_display(pixels)
    assert pixels.dtype == np.uint16
    assert pixels[0, 0, 0] == frame_value(2, 1)
    assert display.dtype == np.uint8
    assert display.shape[2] == 3


def test_dicom_files_without_suffix_form_one_slide(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    first = write_dicom(folder / "a.dcm")
    # A second instance of the same series, with no file name suffix.
    dataset = pydicom.dcmread(first)
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    dataset.save_as(folder / "7_0", enforce_file_format=True)
    (folder / "notes").write_text("not a slide")
    from tiled.slides import walk_slides

    # One entry for the series: its first file by name.
    assert list(walk_slides(str(tmp_path))) == ["series/7_0"]


def test_non_wsi_dicom_rejected(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm")
    dataset = pydicom.dcmread(path)
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedSlide, match="not a VL Whole Slide"):
        open_slide(path)


# --- TIFF family -------------------------------------------------------------


def _write_jpeg_tiff(path: Path, tiles: list[bytes], size: int, tile: int) -> None:
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            iter(tiles),
            shape=(size, size, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
        )
    # tifffile marks JPEG data as YCbCr; these tiles hold RGB, as in SVS.
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        tiff.pages.first.tags["PhotometricInterpretation"].overwrite(2)


@pytest.mark.parametrize("with_app14", [False, True])
def test_rgb_jpeg_tiles_with_and_without_app14(tmp_path, with_app14):
    """RGB-encoded tiles (no colour transform) decode to the right colours."""
    colour = np.zeros((64, 64, 3), dtype=np.uint8)
    colour[...] = (200, 30, 60)
    data = imagecodecs.jpeg8_encode(
        colour, level=95, colorspace="RGB", outcolorspace="RGB"
    )
    # libjpeg-turbo marks RGB output with APP14; TIFF writers often do not.
    assert data[2:4] == b"\xff\xee"
    if not with_app14:
        length = int.from_bytes(data[4:6], "big")
        data = data[:2] + data[4 + length :]
        assert not has_adobe_marker(data)
    path = tmp_path / "rgb.tif"
    _write_jpeg_tiff(path, [data] * 4, 128, 64)
    with open_slide(path) as reader:
        tile = reader.read_tile(0, 1, 1)
    assert has_adobe_marker(tile.data)
    pixels = decode_jpeg(tile.data)
    assert np.abs(pixels[10, 10].astype(int) - (200, 30, 60)).max() <= 3


def _zero_length_tile(path: Path, index: int) -> None:
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        counts = list(tiff.pages.first.databytecounts)
        counts[index] = 0
        tiff.pages.first.tags["TileByteCounts"].overwrite(counts)


async def test_zero_length_edge_tile_is_background(tmp_path, make_daemon):
    path = write_slide(tmp_path / "edge.svs", 600, 500, aperio=True)
    # Level 0 has 3x2 tiles of 256; the last one is the bottom-right edge.
    _zero_length_tile(path, 5)
    with open_slide(path) as reader:
        assert reader.read_tile(0, 2, 1) is None
        region = reader.read_region(0, 512, 256, 88, 244)
    assert (region == 255).all()
    daemon = make_daemon([tmp_path])
    slide_id = slide_id_for("edge.svs")
    info = daemon.get_json(f"/slides/{slide_id}")
    z = info["deepzoom"]["level_count"] - 1
    status, _, body = daemon.get(f"/slides/{slide_id}_files/{z}/2_1.jpeg")
    assert status == 200, body
    status, _, _ = daemon.get(f"/slides/{slide_id}_files/{z}/0_0.jpeg")
    assert status == 200


def test_corrupt_jpeg_tile_fails_only_that_tile(tmp_path):
    path = write_slide(tmp_path / "bad.svs", 512, 512, aperio=True, downsamples=(1,))
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        offset = page.dataoffsets[1]
    with open(path, "r+b") as file:
        # Damage the entropy data in the middle of tile 1.
        file.seek(offset + 400)
        file.write(b"\xff\xd9" * 200)
    from tiled.pyramid import DeepZoomGeometry, TileMaker

    with open_slide(path) as reader:
        geometry = DeepZoomGeometry(reader.levels, 256, 0)
        maker = TileMaker(reader, geometry, 90, lambda *a: None)
        z = geometry.level_count - 1
        assert maker.make(z, 0, 0).data
        with pytest.raises(CorruptSlide):
            maker.make(z, 1, 0)


def test_aperio_jpeg2000_ycbcr_converted(tmp_path):
    """Compression 33003 tiles hold YCbCr without the MCT; they decode to RGB."""
    rgb = tissue_pixels(0, 0, 256, 256, 1.0)
    ycbcr = imagecodecs.jpeg8_decode(
        imagecodecs.jpeg8_encode(
            rgb, level=100, colorspace="RGB", outcolorspace="YCbCr"
        ),
        colorspace="YCbCr",
        outcolorspace="YCbCr",
    )
    tile = imagecodecs.jpeg2k_encode(ycbcr, level=0, mct=False, codecformat="j2k")
    path = tmp_path / "jp2k.svs"
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            iter([tile] * 4),
            shape=(512, 512, 3),
            dtype=np.uint8,
            tile=(256, 256),
            compression=33003,
            photometric="rgb",
            description="Aperio Image Library v12\r\n512x512 (256x256) J2K|MPP = 0.5",
            metadata=None,
        )
    with open_slide(path) as reader:
        assert reader.format == "aperio"
        assert reader.is_lossy
        pixels = reader.read_tile_pixels(0, 1, 0)
    assert np.abs(pixels.astype(int) - ycbcr_to_rgb(ycbcr)).max() <= 1
    assert np.abs(pixels.astype(int) - rgb).mean() < 3


def test_strip_tiff_served_as_virtual_tiles(tmp_path, make_daemon):
    pixels = tissue_pixels(0, 0, 1500, 1100, 1.0)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, pixels, rowsperstrip=16, compression="zlib", metadata=None)
    with open_slide(path) as reader:
        assert len(reader.levels) == 1
        assert reader.levels[0].tile_width == 512
        assert np.array_equal(
            reader.read_region(0, 700, 300, 600, 500), pixels[300:800, 700:1300]
        )
    daemon = make_daemon([tmp_path])
    slide_id = slide_id_for("strips.tif")
    info = daemon.get_json(f"/slides/{slide_id}")
    z = info["deepzoom"]["level_count"] - 1
    status, _, body = daemon.get(f"/slides/{slide_id}_files/{z}/1_1.png")
    assert status == 200
    tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert np.array_equal(tile, pixels[512:1024, 512:1024])
    # A coarse level the file lacks is made by tiled's pyramid.
    status, _, body = daemon.get(f"/slides/{slide_id}_files/{z - 3}/0_0.png")
    assert status == 200
    assert Image.open(io.BytesIO(body)).size == (188, 138)


@pytest.mark.parametrize(
    ("resolution", "unit"),
    [
        (((40000, 1), (40000, 1)), "CENTIMETER"),
        (((400000, 10), (400000, 10)), "CENTIMETER"),
        (((101600, 1), (101600, 1)), "INCH"),
        (((1016000, 10), (1016000, 10)), "INCH"),
    ],
)
def test_resolution_rationals_same_mpp(tmp_path, resolution, unit):
    path = tmp_path / "res.tif"
    write_slide(path, 300, 300, mpp=None, downsamples=(1,))
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        tags = tiff.pages.first.tags
        x, y = resolution
        tags["XResolution"].overwrite(x)
        tags["YResolution"].overwrite(y)
        unit_value = 3 if unit == "CENTIMETER" else 2
        if "ResolutionUnit" in tags:
            tags["ResolutionUnit"].overwrite(unit_value)
    with open_slide(path) as reader:
        assert reader.mpp == pytest.approx((0.25, 0.25))


def test_placeholder_resolution_is_no_mpp(tmp_path):
    path = tmp_path / "dpi.tif"
    pixels = tissue_pixels(0, 0, 256, 256, 1.0)
    tifffile.imwrite(
        path, pixels, tile=(128, 128), resolution=(72, 72), resolutionunit="INCH"
    )
    with open_slide(path) as reader:
        assert reader.mpp is None


def test_aperio_mpp_wins_over_resolution(tmp_path):
    path = write_slide(tmp_path / "a.svs", 300, 300, aperio=True, mpp=0.5)
    with open_slide(path) as reader:
        assert reader.mpp == pytest.approx((0.5, 0.5))


# --- OME-TIFF ----------------------------------------------------------------


def test_ome_pyramid_16bit_channels(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, size=(2, 1024, 768), dtype=np.uint16)
    path = tmp_path / "fluo.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        options = {
            "tile": (256, 256),
            "compression": "zlib",
            "photometric": "minisblack",
        }
        writer.write(
            data,
            subifds=2,
            metadata={
                "axes": "CYX",
                "PhysicalSizeX": 0.65,
                "PhysicalSizeY": 0.65,
                "Channel": {"Name": ["DAPI", "FITC"], "Color": [65535, -16776961]},
            },
            **options,
        )
        for factor in (2, 4):
            writer.write(data[:, ::factor, ::factor], subfiletype=1, **options)
    with open_slide(path) as reader:
        assert reader.format == "ome-tiff"
        assert reader.bits == 16
        assert reader.samples == 2
        assert [level.width for level in reader.levels] == [768, 384, 192]
        assert reader.mpp == pytest.approx((0.65, 0.65))
        assert reader.channels[0]["color"] == "#0000ff"
        assert reader.channels[1]["color"] == "#ff0000"
        region = reader.read_region(1, 10, 20, 100, 50)
        assert np.array_equal(
            region, np.moveaxis(data[:, ::2, ::2], 0, -1)[20:70, 10:110]
        )
        display = reader.to_display(region)
        assert display.shape == (50, 100, 3)
        assert display.dtype == np.uint8
        assert "ome.channel.0.Name" in reader.withheld_properties
        assert "ome.channel.0.Name" not in reader.properties


def test_unsupported_file_names_reason(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("Patient: Jane Doe\n" * 50)
    with pytest.raises(UnsupportedSlide) as error:
        open_slide(path)
    assert "no reader accepts this file" in str(error.value)
    assert str(tmp_path) not in str(error.value)


def test_cli_info_names_file_and_reason(tmp_path, capsys):
    from tiled.cli import main

    path = tmp_path / "notes.svs"
    path.write_text("not a slide")
    assert main(["info", str(path)]) == 1
    assert f"{path}: no reader accepts this file" in capsys.readouterr().err


# --- OpenSlide fallback ---------------------------------------------------------


def test_openslide_reader_matches_openslide():
    openslide = pytest.importorskip("openslide")
    from tests.conftest import sample
    from tiled.readers.openslide import OpenSlideReader

    path = sample("aperio-svs/wsi-to-dicom-converter/CMU-1-Small-Region.svs")
    with OpenSlideReader(str(path)) as reader:
        assert reader.format == "openslide-aperio"
        assert reader.mpp == pytest.approx((0.499, 0.499))
        assert set(reader.associated_images) == {"label", "macro", "thumbnail"}
        pixels = reader.read_tile_pixels(0, 1, 2)
    with openslide.OpenSlide(str(path)) as slide:
        expected = np.asarray(
            slide.read_region((512, 1024), 0, (512, 512)).convert("RGB")
        )
    assert np.array_equal(pixels, expected)


def test_openslide_reader_rejects_plain_files(tmp_path):
    pytest.importorskip("openslide")
    from tiled.readers.openslide import OpenSlideReader

    path = tmp_path / "x.mrxs"
    path.write_text("[GENERAL]\n")
    with pytest.raises((UnsupportedSlide, CorruptSlide)):
        OpenSlideReader(str(path))


def test_slide_json_lists_dicom_optical_path(tmp_path, make_daemon):
    write_dicom(tmp_path / "one.dcm")
    daemon = make_daemon([tmp_path])
    info = daemon.get_json(f"/slides/{slide_id_for('one.dcm')}")
    assert info["format"] == "dicom"
    assert info["properties"]["dicom.served_optical_path"] == "1"
    assert json.dumps(info).find("DOE") < 0


def test_png16_tile_keeps_source_samples(tmp_path, make_daemon):
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 65535, size=(300, 400), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "grey16.ome.tif", grey, ome=True, tile=(256, 256))
    two = rng.integers(0, 4000, size=(2, 300, 400), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "two.ome.tif", two, ome=True, metadata={"axes": "CYX"})
    write_slide(tmp_path / "lossy.svs", 400, 300, aperio=True)
    daemon = make_daemon([tmp_path])
    grey_id = slide_id_for("grey16.ome.tif")
    z = daemon.get_json(f"/slides/{grey_id}")["deepzoom"]["level_count"] - 1
    status, headers, body = daemon.get(
        f"/slides/{grey_id}_files/{z}/0_0.png?format=png16"
    )
    assert status == 200, body
    assert headers["Content-Type"] == "image/png"
    pixels = imagecodecs.png_decode(body)
    assert pixels.dtype == np.uint16
    assert np.array_equal(pixels.reshape(256, 256), grey[:256, :256])
    status, _, body = daemon.get(f"/slides/{grey_id}_files/{z}/0_0.png")
    assert status == 200
    assert imagecodecs.png_decode(body).dtype == np.uint8
    status, _, body = daemon.get(
        f"/slides/{slide_id_for('two.ome.tif')}_files/{z}/0_0.png?format=png16"
    )
    assert status == 400
    assert "2 channels" in json.loads(body)["message"]
    status, _, _ = daemon.get(
        f"/slides/{slide_id_for('lossy.svs')}_files/{z}/0_0.png?format=png16"
    )
    assert status == 400
