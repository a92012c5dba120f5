"""DICOMweb (QIDO-RS and WADO-RS) at /dicomweb: every slide as a DICOM series.

Each slide is one study holding one VL Whole Slide Microscopy series, with
one TILED_FULL instance per DeepZoom level from full resolution down to the
first level that fits in one tile. Frame n of an instance is DeepZoom tile
((n - 1) % columns, (n - 1) // columns) of its level.

UIDs are ISO/IEC 9834-8 UUID-derived ("2.25." and the UUID as a decimal),
with the UUID hashed from the slide id, so they stay the same across
restarts and hosts. Patient and study attributes are present but empty.

Frames are sent as JPEG baseline (1.2.840.10008.1.2.4.50), passing stored
JPEG tiles through, or as Explicit VR Little Endian (1.2.840.10008.1.2.1)
uncompressed pixels. DICOM requires every frame to be Rows x Columns, so
edge tiles are padded with white; padded JPEG frames are kept in the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import secrets
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
from aiohttp import web
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from tiled.codecs import Codec, Tile, decode_tile, encode_jpeg, to_rgb8
from tiled.errors import BadRequest, NotFound, TiledError
from tiled.regions import (
    Box,
    encode_image,
    fit_within,
    limits_of,
    read_level_region,
    render,
    service_of,
)
from tiled.slides import SlideEntry, SlidePyramid
from tiled.store import tile_key

VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"
TRANSFER_SYNTAXES = (str(JPEGBaseline8Bit), str(ExplicitVRLittleEndian))
DICOM_JSON = "application/dicom+json"
# Store variant suffix of JPEG frames padded to the full tile size.
PADDED_VARIANT_SUFFIX = "-dicom"


class NotAcceptable(TiledError):
    """Raised if no media type in the Accept header can be served."""

    status = 406
    code = "not_acceptable"


def uid_for(*parts: object) -> str:
    """Return a stable UUID-derived UID ("2.25." + decimal) for the given parts."""
    digest = hashlib.blake2b(
        "/".join(("tiled", *map(str, parts))).encode(), digest_size=16
    ).digest()
    return f"2.25.{uuid.UUID(bytes=digest, version=4).int}"


class SlideSeries:
    """The DICOM view of one slide: its UIDs and one instance per level."""

    def __init__(self, entry: SlideEntry, pyramid: SlidePyramid) -> None:
        self.entry = entry
        self.pyramid = pyramid
        geometry = pyramid.geometry
        self.study_uid = uid_for("study", entry.id)
        # The generation changes when the source file does, so a replaced
        # slide gets new series and instance UIDs; restarts keep them.
        self.series_uid = uid_for(
            "series", entry.id, pyramid.variant, pyramid.generation
        )
        self.frame_of_reference_uid = uid_for("frame-of-reference", entry.id)
        # Levels below full resolution, down to the first that fits one tile.
        self.steps: list[int] = []
        for steps in range(geometry.level_count):
            self.steps.append(steps)
            width, height = geometry.level_dimensions[geometry.level_count - 1 - steps]
            if width <= geometry.tile_size and height <= geometry.tile_size:
                break
        self.instance_uids = {self.instance_uid(steps): steps for steps in self.steps}

    def instance_uid(self, steps: int) -> str:
        pyramid = self.pyramid
        return uid_for(
            "instance", self.entry.id, pyramid.variant, pyramid.generation, steps
        )

    def level(self, instance_uid: str) -> int:
        """Return the DeepZoom level z of an instance UID of this series."""
        steps = self.instance_uids.get(instance_uid)
        if steps is None:
            raise NotFound(f"no instance {instance_uid} in series {self.series_uid}")
        return self.pyramid.geometry.level_count - 1 - steps

    @property
    def lossy(self) -> bool:
        return self.pyramid.lossy


def _empty_patient_and_study(dataset: Dataset) -> None:
    """Set the type 2 patient and study attributes, empty (nothing identifying)."""
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(dataset, keyword, "")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def instance_dataset(series: SlideSeries, steps: int) -> Dataset:
    """Build the metadata of the instance of one level (no pixel data)."""
    pyramid = series.pyramid
    geometry = pyramid.geometry
    z = geometry.level_count - 1 - steps
    width, height = geometry.level_dimensions[z]
    columns, rows = geometry.level_tiles[z]
    size = geometry.tile_size
    image_type = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if steps == 0
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )

    dataset = Dataset()
    dataset.SOPClassUID = VL_WHOLE_SLIDE
    dataset.SOPInstanceUID = series.instance_uid(steps)
    dataset.StudyInstanceUID = series.study_uid
    dataset.SeriesInstanceUID = series.series_uid
    dataset.FrameOfReferenceUID = series.frame_of_reference_uid
    dataset.Modality = "SM"
    _empty_patient_and_study(dataset)
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = steps + 1
    dataset.Manufacturer = "tiled"
    dataset.ImageType = image_type

    dataset.PositionReferenceIndicator = "SLIDE_CORNER"
    dataset.ContainerIdentifier = series.entry.id
    dataset.IssuerOfTheContainerIdentifierSequence = []
    dataset.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    dataset.SpecimenDescriptionSequence = []
    dataset.VolumetricProperties = "VOLUME"
    dataset.SpecimenLabelInImage = "NO"
    dataset.BurnedInAnnotation = "NO"
    dataset.FocusMethod = "AUTO"
    dataset.ExtendedDepthOfField = "NO"
    dataset.AcquisitionDateTime = ""
    dataset.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]

    dataset.DimensionOrganizationType = "TILED_FULL"
    dataset.TotalPixelMatrixColumns = width
    dataset.TotalPixelMatrixRows = height
    dataset.TotalPixelMatrixFocalPlanes = 1
    dataset.NumberOfFocalPlanes = 1
    dataset.NumberOfOpticalPaths = 1
    dataset.Rows = size
    dataset.Columns = size
    dataset.NumberOfFrames = columns * rows
    dataset.SamplesPerPixel = 3
    # JPEG baseline frames, stored or encoded here, are YCbCr 4:2:0, which
    # PS3.5 names YBR_FULL_422 and decoders such as wsidicom rely on.
    # NOTE: frames sent uncompressed (1.2.840.10008.1.2.1) hold RGB samples,
    # which this one metadata document cannot also state.
    dataset.PhotometricInterpretation = "YBR_FULL_422"
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.LossyImageCompression = "01" if series.lossy else "00"
    if series.lossy:
        dataset.LossyImageCompressionMethod = "ISO_10918_1"

    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    dataset.TotalPixelMatrixOriginSequence = [origin]
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    optical_path.IlluminationTypeCodeSequence = [
        _code("111744", "DCM", "Brightfield illumination")
    ]
    optical_path.IlluminationColorCodeSequence = [
        _code("414298005", "SCT", "Full Spectrum")
    ]
    dataset.OpticalPathSequence = [optical_path]

    frame_type = Dataset()
    frame_type.FrameType = image_type
    shared = Dataset()
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    mpp = pyramid.record.get("mpp")
    if mpp:
        downsample = geometry.downsample(z)
        # PixelSpacing is row spacing then column spacing, in millimetres.
        spacing_y = mpp[1] * downsample / 1000
        spacing_x = mpp[0] * downsample / 1000
        measures = Dataset()
        measures.PixelSpacing = [_decimal(spacing_y), _decimal(spacing_x)]
        measures.SliceThickness = _decimal(0.001)
        shared.PixelMeasuresSequence = [measures]
        dataset.ImagedVolumeWidth = width * spacing_x
        dataset.ImagedVolumeHeight = height * spacing_y
        dataset.ImagedVolumeDepth = 0.001
    # NOTE: without a stated mpp no PixelSpacing is sent; viewers then show
    # the slide without a scale bar.
    dataset.SharedFunctionalGroupsSequence = [shared]
    return dataset


def _decimal(value: float) -> str:
    """Format a number as a DICOM DS (at most 16 characters)."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.9e}"
    return text


# QIDO-RS


STUDY_FIELDS = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber")
INSTANCE_FIELDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "InstanceNumber",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
)
# Query keys that are not attribute filters.
QUERY_CONTROLS = {"includefield", "limit", "offset", "fuzzymatching"}


def _keyword(key: str) -> str | None:
    """Return the attribute keyword of a query key given as keyword or tag."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return keyword_for_tag(int(key, 16)) or None
    return key if tag_for_keyword(key) is not None else None


def _filters(request: web.Request) -> dict[str, list[str]]:
    """Return attribute filters of a QIDO query as keyword -> accepted values."""
    filters: dict[str, list[str]] = {}
    for key, value in request.query.items():
        if key.lower() in QUERY_CONTROLS:
            continue
        keyword = _keyword(key)
        if keyword is None:
            raise BadRequest(f"unknown query attribute {key!r}")
        # A comma-separated value is a UID list (PS3.18 8.3.4.1).
        filters.setdefault(keyword, []).extend(
            part for part in value.split(",") if part
        )
    return filters


def _matches(dataset: Dataset, filters: dict[str, list[str]]) -> bool:
    for keyword, values in filters.items():
        if keyword not in dataset:
            # NOTE: a filter on an attribute tiled does not hold is ignored,
            # as PS3.18 allows for attributes a server does not support.
            continue
        actual = dataset.data_element(keyword).value
        actual_values = (
            [str(item) for item in actual]
            if isinstance(actual, list | tuple)
            else [str(actual)]
        )
        if not any(_wildcard_match(value, actual_values) for value in values):
            return False
    return True


def _wildcard_match(pattern: str, values: list[str]) -> bool:
    if "*" in pattern or "?" in pattern:
        expression = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
        return any(re.fullmatch(expression, value) for value in values)
    return pattern in values


def _paged(request: web.Request, items: list[Any]) -> list[Any]:
    def number(name: str, default: int) -> int:
        text = request.query.get(name)
        if text is None:
            return default
        if not text.isdigit():
            raise BadRequest(f"query parameter {name!r} must be a whole number")
        return int(text)

    offset = number("offset", 0)
    limit = number("limit", len(items))
    return items[offset : offset + limit]


def _json(data: Any) -> web.Response:
    from tiled.server import json_response

    response = json_response(data, headers={"Cache-Control": "no-cache"})
    response.content_type = DICOM_JSON
    return response


async def _all_series(request: web.Request) -> list[SlideSeries]:
    """Return the series of every slide that opens, in catalog order."""
    from tiled.server import CATALOG

    catalog = request.app[CATALOG]
    service = service_of(request)
    result = []
    for entry in catalog.entries():
        try:
            pyramid = await service.pyramid(entry)
        except TiledError:
            continue
        result.append(SlideSeries(entry, pyramid))
    return result


async def _find_series(
    request: web.Request, study_uid: str, series_uid: str | None = None
) -> list[SlideSeries]:
    found = [
        series
        for series in await _all_series(request)
        if series.study_uid == study_uid
        and (series_uid is None or series.series_uid == series_uid)
    ]
    if not found:
        missing = f"series {series_uid}" if series_uid else f"study {study_uid}"
        raise NotFound(f"no {missing}")
    return found


def _study_dataset(series: SlideSeries) -> Dataset:
    dataset = Dataset()
    dataset.StudyInstanceUID = series.study_uid
    _empty_patient_and_study(dataset)
    dataset.ModalitiesInStudy = "SM"
    dataset.NumberOfStudyRelatedSeries = 1
    dataset.NumberOfStudyRelatedInstances = len(series.steps)
    return dataset


def _series_dataset(series: SlideSeries) -> Dataset:
    dataset = Dataset()
    dataset.StudyInstanceUID = series.study_uid
    dataset.SeriesInstanceUID = series.series_uid
    dataset.Modality = "SM"
    dataset.SeriesNumber = 1
    dataset.NumberOfSeriesRelatedInstances = len(series.steps)
    return dataset


def _instance_summary(series: SlideSeries, steps: int) -> Dataset:
    full = instance_dataset(series, steps)
    dataset = Dataset()
    for keyword in INSTANCE_FIELDS:
        setattr(dataset, keyword, full.data_element(keyword).value)
    dataset.AvailableTransferSyntaxUID = list(TRANSFER_SYNTAXES)
    return dataset


def _with_included(dataset: Dataset, full: Dataset, request: web.Request) -> Dataset:
    """Add attributes named by includefield that the full metadata holds."""
    for value in request.query.getall("includefield", []):
        for key in value.split(","):
            keyword = _keyword(key)
            if keyword and keyword in full and keyword not in dataset:
                setattr(dataset, keyword, full.data_element(keyword).value)
    return dataset


async def search_studies(request: web.Request) -> web.Response:
    filters = _filters(request)
    results = []
    for series in await _all_series(request):
        dataset = _study_dataset(series)
        if _matches(dataset, filters):
            results.append(dataset.to_json_dict())
    return _json(_paged(request, results))


async def search_series(request: web.Request) -> web.Response:
    filters = _filters(request)
    study_uid = request.match_info.get("study")
    results = []
    for series in await _all_series(request):
        if study_uid is not None and series.study_uid != study_uid:
            continue
        dataset = _series_dataset(series)
        if _matches(dataset, filters):
            results.append(dataset.to_json_dict())
    return _json(_paged(request, results))


async def search_instances(request: web.Request) -> web.Response:
    filters = _filters(request)
    study_uid = request.match_info.get("study")
    series_uid = request.match_info.get("series")
    results = []
    for series in await _all_series(request):
        if study_uid is not None and series.study_uid != study_uid:
            continue
        if series_uid is not None and series.series_uid != series_uid:
            continue
        for steps in series.steps:
            dataset = _instance_summary(series, steps)
            if _matches(dataset, filters):
                full = instance_dataset(series, steps)
                results.append(_with_included(dataset, full, request).to_json_dict())
    return _json(_paged(request, results))


# WADO-RS metadata


async def series_metadata(request: web.Request) -> web.Response:
    info = request.match_info
    (series,) = await _find_series(request, info["study"], info["series"])
    return _json([instance_dataset(series, s).to_json_dict() for s in series.steps])


async def study_metadata(request: web.Request) -> web.Response:
    found = await _find_series(request, request.match_info["study"])
    return _json(
        [
            instance_dataset(series, s).to_json_dict()
            for series in found
            for s in series.steps
        ]
    )


async def instance_metadata(request: web.Request) -> web.Response:
    series, z = await _instance(request)
    steps = series.pyramid.geometry.level_count - 1 - z
    return _json([instance_dataset(series, steps).to_json_dict()])


async def _instance(request: web.Request) -> tuple[SlideSeries, int]:
    info = request.match_info
    (series,) = await _find_series(request, info["study"], info["series"])
    return series, series.level(info["instance"])


# WADO-RS frames


def _media_ranges(header: str) -> list[tuple[str, dict[str, str]]]:
    """Parse an Accept header into (media type, parameters), in order given."""
    ranges = []
    for item in header.split(","):
        parts = [part.strip() for part in item.split(";")]
        if not parts[0]:
            continue
        parameters = {}
        for parameter in parts[1:]:
            name, _, value = parameter.partition("=")
            parameters[name.strip().lower()] = value.strip().strip('"')
        ranges.append((parts[0].lower(), parameters))
    return ranges


def choose_frame_syntax(accept: str, preferred: str) -> str:
    """Return the transfer syntax to send frames in for an Accept header.

    A wildcard or missing header gets ``preferred``. Raise NotAcceptable if
    the header allows neither JPEG baseline nor Explicit VR Little Endian.
    """
    if not accept.strip():
        return preferred
    jpeg, uncompressed = str(JPEGBaseline8Bit), str(ExplicitVRLittleEndian)
    for media_type, parameters in _media_ranges(accept):
        syntax = parameters.get("transfer-syntax", "*")
        if media_type == "multipart/related":
            media_type = parameters.get("type", "application/octet-stream").lower()
        if media_type in ("*/*", "multipart/*") and syntax in ("*", preferred):
            return preferred
        if media_type in ("image/jpeg", "image/*") and syntax in ("*", jpeg):
            return jpeg
        if media_type == "application/octet-stream" and syntax in ("*", uncompressed):
            return uncompressed
    raise NotAcceptable(
        "frames are available as multipart/related with type image/jpeg "
        f"(transfer-syntax={jpeg}) or application/octet-stream "
        f"(transfer-syntax={uncompressed})"
    )


def _frame_numbers(text: str, count: int, limit: int) -> list[int]:
    if not re.fullmatch(r"\d{1,9}(,\d{1,9})*", text):
        raise BadRequest(f"invalid frame list {text!r}; use numbers like 1,2,3")
    numbers = [int(part) for part in text.split(",")]
    if len(numbers) > limit:
        raise BadRequest(f"{len(numbers)} frames requested; at most {limit}")
    for number in numbers:
        if not 1 <= number <= count:
            raise NotFound(f"no frame {number}; frames are numbered 1 to {count}")
    return numbers


def _frame_address(series: SlideSeries, z: int, number: int) -> tuple[int, int]:
    columns, _ = series.pyramid.geometry.level_tiles[z]
    return (number - 1) % columns, (number - 1) // columns


async def frame_pixels(
    series: SlideSeries, service: Any, z: int, t_col: int, t_row: int
) -> np.ndarray:
    """Return one frame as 8-bit RGB, Rows x Columns, white beyond the level."""
    geometry = series.pyramid.geometry
    size = geometry.tile_size
    x0, y0 = t_col * size, t_row * size
    pixels = await read_level_region(
        service, series.pyramid, z, x0, y0, x0 + size, y0 + size
    )
    return to_rgb8(pixels)


async def jpeg_frame(
    series: SlideSeries, service: Any, z: int, t_col: int, t_row: int
) -> bytes:
    """Return one frame as JPEG, the stored tile itself when it is full-size."""
    pyramid = series.pyramid
    geometry = pyramid.geometry
    size = geometry.tile_size
    tile, _ = await service.tile(pyramid, z, t_col, t_row)
    if (
        tile.codec == Codec.JPEG
        and geometry.overlap == 0
        and (tile.width, tile.height) == (size, size)
    ):
        return tile.data
    variant = pyramid.variant + PADDED_VARIANT_SUFFIX
    entry_id, generation = pyramid.entry.id, pyramid.generation
    stored = pyramid.store.get_tile(entry_id, generation, variant, z, t_col, t_row)
    if stored is not None:
        return stored.data
    key = tile_key(entry_id, generation, variant, z, t_col, t_row)
    if pyramid.writer is not None:
        pending = pyramid.writer.pending(key)
        if pending is not None:
            return pending.data
    pixels = await frame_pixels(series, service, z, t_col, t_row)
    data = await service.run(encode_jpeg, pixels, pyramid.jpeg_quality)
    padded = Tile(Codec.JPEG, size, size, data, 3, 8)
    if pyramid.writer is not None:
        pyramid.writer.put([(key, padded)])
    else:
        await service.run(pyramid.store.put_tiles, [(key, padded)])
    return data


async def raw_frame(
    series: SlideSeries, service: Any, z: int, t_col: int, t_row: int
) -> bytes:
    pyramid = series.pyramid
    size = pyramid.geometry.tile_size
    tile, _ = await service.tile(pyramid, z, t_col, t_row)
    if pyramid.geometry.overlap == 0 and (tile.width, tile.height) == (size, size):
        pixels = await service.run(decode_tile, tile)
        return to_rgb8(pixels).tobytes()
    pixels = await frame_pixels(series, service, z, t_col, t_row)
    return pixels.tobytes()


def multipart_related(
    parts: Iterable[bytes], media_type: str, syntax: str
) -> tuple[bytes, str]:
    """Return a multipart/related body and its Content-Type header value."""
    boundary = secrets.token_hex(16)
    part_type = f"{media_type}; transfer-syntax={syntax}"
    chunks = []
    for part in parts:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {part_type}\r\n"
            f"Content-Length: {len(part)}\r\n\r\n".encode()
        )
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = (
        f'multipart/related; type="{media_type}"; transfer-syntax={syntax}; '
        f"boundary={boundary}"
    )
    return b"".join(chunks), content_type


async def frames(request: web.Request) -> web.Response:
    series, z = await _instance(request)
    # Without a stated preference frames go out as stored: JPEG for lossy
    # sources, uncompressed for lossless ones.
    preferred = str(JPEGBaseline8Bit if series.lossy else ExplicitVRLittleEndian)
    syntax = choose_frame_syntax(request.headers.get("Accept", ""), preferred)
    columns, rows = series.pyramid.geometry.level_tiles[z]
    limit = limits_of(request).batch_max_tiles
    numbers = _frame_numbers(request.match_info["frames"], columns * rows, limit)
    service = service_of(request)
    make = jpeg_frame if syntax == str(JPEGBaseline8Bit) else raw_frame
    bodies = await asyncio.gather(
        *(make(series, service, z, *_frame_address(series, z, n)) for n in numbers)
    )
    media_type = "image/jpeg" if make is jpeg_frame else "application/octet-stream"
    body, content_type = multipart_related(bodies, media_type, syntax)
    response = web.Response(body=body, headers={"Cache-Control": "no-cache"})
    response.headers["Content-Type"] = content_type
    return response


# Rendered resources and thumbnails


def _rendered_format(request: web.Request) -> tuple[str, str]:
    """Return (format for encode_image, media type) chosen from Accept."""
    accept = request.headers.get("Accept", "")
    for media_type, _ in _media_ranges(accept):
        if media_type in ("image/jpeg", "image/*", "*/*"):
            return "jpeg", "image/jpeg"
        if media_type == "image/png":
            return "png", "image/png"
    if accept.strip():
        raise NotAcceptable("rendered images are available as image/jpeg or image/png")
    return "jpeg", "image/jpeg"


async def rendered_frame(request: web.Request) -> web.Response:
    series, z = await _instance(request)
    image_format, media_type = _rendered_format(request)
    columns, rows = series.pyramid.geometry.level_tiles[z]
    numbers = _frame_numbers(request.match_info["frames"], columns * rows, 1)
    service = service_of(request)
    pixels = await frame_pixels(
        series, service, z, *_frame_address(series, z, numbers[0])
    )
    body = await service.run(encode_image, pixels, image_format, 90)
    return web.Response(body=body, content_type=media_type)


def _viewport(request: web.Request, default: int) -> tuple[int, int]:
    text = request.query.get("viewport")
    if text is None:
        return default, default
    match = re.fullmatch(r"(\d{1,5}),(\d{1,5})", text)
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        raise BadRequest(f"invalid viewport {text!r}; use width,height in pixels")
    return int(match[1]), int(match[2])


async def _render_whole(
    request: web.Request, series: SlideSeries, z: int, default_viewport: int
) -> web.Response:
    image_format, media_type = _rendered_format(request)
    geometry = series.pyramid.geometry
    width, height = geometry.level_dimensions[z]
    box_width, box_height = _viewport(request, default_viewport)
    out_width, out_height = fit_within(width, height, box_width, box_height)
    downsample = geometry.downsample(z)
    full_width, full_height = geometry.level_dimensions[-1]
    box = Box(
        0, 0, min(full_width, width * downsample), min(full_height, height * downsample)
    )
    service = service_of(request)
    limits = limits_of(request)
    pixels = await render(service, series.pyramid, box, out_width, out_height, limits)
    body = await service.run(encode_image, pixels, image_format, 90)
    return web.Response(
        body=body, content_type=media_type, headers={"Cache-Control": "no-cache"}
    )


async def rendered_instance(request: web.Request) -> web.Response:
    series, z = await _instance(request)
    # The default viewport is the largest square within the area limit.
    viewport = math.isqrt(limits_of(request).max_area)
    return await _render_whole(request, series, z, viewport)


async def instance_thumbnail(request: web.Request) -> web.Response:
    series, z = await _instance(request)
    return await _render_whole(request, series, z, 256)


async def series_thumbnail(request: web.Request) -> web.Response:
    info = request.match_info
    found = await _find_series(request, info["study"], info.get("series"))
    series = found[0]
    return await _render_whole(
        request, series, series.pyramid.geometry.level_count - 1, 256
    )


def add_routes(app: web.Application) -> None:
    base = "/dicomweb"
    study = base + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    app.router.add_get(base + "/studies", search_studies)
    app.router.add_get(base + "/series", search_series)
    app.router.add_get(base + "/instances", search_instances)
    app.router.add_get(study + "/series", search_series)
    app.router.add_get(study + "/instances", search_instances)
    app.router.add_get(series + "/instances", search_instances)
    app.router.add_get(study + "/metadata", study_metadata)
    app.router.add_get(series + "/metadata", series_metadata)
    app.router.add_get(instance + "/metadata", instance_metadata)
    app.router.add_get(instance + "/frames/{frames}", frames)
    app.router.add_get(instance + "/frames/{frames}/rendered", rendered_frame)
    app.router.add_get(instance + "/rendered", rendered_instance)
    app.router.add_get(instance + "/thumbnail", instance_thumbnail)
    app.router.add_get(series + "/thumbnail", series_thumbnail)
    app.router.add_get(study + "/thumbnail", series_thumbnail)
