"""Readers of the TIFF family: Aperio SVS, Hamamatsu NDPI and generic TIFF.

tifffile parses the container, including NDPI's JPEG restart-interval strips
and its high offset bits above 4 GB. Tile and strip bytes are read with
``os.pread`` so threads never share a file position, and tifffile's
``TiffPage.decode`` turns them into pixels.

A level whose tiles can be served as they are ("native" tiles) keeps the
file's tile grid. Strip-based pages, NDPI strips and odd tile sizes become a
grid of virtual 512-pixel tiles assembled from the decoded chunks. A
single-level strip TIFF is thus read region by region, and tiled's pyramid
makes its lower levels.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
from collections.abc import Mapping

import numpy as np
import tifffile

from tiled.codecs import Codec, Tile, jpeg_with_tables, pack_raw
from tiled.errors import CorruptSlide, UnsupportedSlide
from tiled.readers.base import Level, SlideReader, recognised

log = logging.getLogger("tiled.readers")

JPEG = 7
JPEG2000_YCBCR = 33003
JPEG2000_RGB = 33005
JPEG2000 = 34712
# Compressions whose tiles tifffile decodes and tiled keeps as zstd pixels.
LOSSLESS = {1, 5, 8, 32946, 50000, 34925, 32773}
# Lossy compressions: tiles tiled makes from them are JPEG-encoded.
LOSSY = {JPEG, JPEG2000_YCBCR, JPEG2000_RGB, JPEG2000}
SUPPORTED = LOSSLESS | LOSSY

# Edge of the virtual tiles of strip-based and NDPI levels.
VIRTUAL_TILE = 512
# Native tile edges outside this range are re-cut into virtual tiles.
NATIVE_TILE_RANGE = (16, 4096)
# Bytes of decoded strips and tiles kept per reader. A row of 512-pixel NDPI
# virtual tiles needs 64 full-width strips, so this covers a few such rows.
CHUNK_CACHE_BYTES = 96 << 20

# Aperio ImageDescription keys shown to clients. Everything else (Filename,
# User, Title, Date, Time, ImageID, Barcode, ScanScope ID and any unknown key)
# is withheld because it can identify a patient, a person or a path.
APERIO_ALLOWED = frozenset(
    {
        "AppMag",
        "MPP",
        "StripeWidth",
        "Exposure Time",
        "Exposure Scale",
        "Gamma",
        "Focus Offset",
        "LineCameraSkew",
        "LineAreaXOffset",
        "LineAreaYOffset",
        "OriginalWidth",
        "OriginalHeight",
        "Filmstrip",
        "Left",
        "Top",
    }
)

# Hamamatsu NDPI private tags shown to clients. Comments (which contains
# dates and free text), serial numbers, scan times and the rest are withheld.
NDPI_ALLOWED = frozenset(
    {
        "Make",
        "Model",
        "Magnification",
        "Fluorescence",
        "Wavelength",
        "ExposureTime",
        "XOffsetFromSlideCenter",
        "YOffsetFromSlideCenter",
        "ZOffsetFromSlideCenter",
        "JpegQuality",
    }
)

# Baseline TIFF tags of free text; they are listed as withheld.
TEXT_TAGS = (
    "ImageDescription",
    "DocumentName",
    "PageName",
    "Artist",
    "HostComputer",
    "DateTime",
    "Copyright",
    "Software",
)

# Micrometres per TIFF ResolutionUnit: 2 is inch, 3 is centimetre.
MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0}
# Coarsest level-0 pixel taken as a stated resolution (300 ppi is 84.7 um).
MAX_STATED_MPP = 50.0


def mpp_from_resolution(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """Return microns per pixel from X/YResolution and ResolutionUnit, or None."""
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2
    if unit not in MICRONS_PER_UNIT:
        return None
    values = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            return None
        numerator, denominator = tag.value
        if not numerator or not denominator:
            return None
        pixels_per_unit = numerator / denominator
        microns = MICRONS_PER_UNIT[unit] / pixels_per_unit
        # Writers that know no resolution store a screen or print default
        # such as 72, 96 or 300 pixels per inch, in either unit. No slide
        # scan has pixels that coarse, so such a value states nothing.
        if microns > MAX_STATED_MPP:
            return None
        values.append(microns)
    return values[0], values[1]


def parse_aperio_description(description: str) -> dict[str, str]:
    """Parse the ``key = value`` fields of an Aperio ImageDescription.

    The text is a header line, then the image geometry, then fields split by
    ``|``; the first field is the geometry and has no ``=``.
    """
    fields = {}
    for part in description.replace("\r\n", "\n").split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def jpeg2000_uses_colour_transform(codestream: bytes) -> bool:
    """Return True if a JPEG 2000 codestream's COD segment enables the MCT.

    With the multiple component transform the decoder returns RGB; without
    it Aperio 33003 tiles decode to YCbCr. The COD marker (FF52) is followed
    by Lcod (2 bytes), Scod (1), progression order (1), layers (2), then the
    MCT flag.
    """
    position = codestream.find(b"\xff\x52", 0, 512)
    if position < 0 or position + 9 > len(codestream):
        return False
    return codestream[position + 8] != 0


def ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Convert full-range BT.601 YCbCr (as in JFIF) to RGB, 8-bit."""
    work = pixels[..., :3].astype(np.float32)
    y = work[..., 0]
    cb = work[..., 1] - 128.0
    cr = work[..., 2] - 128.0
    rgb = np.empty(work.shape, dtype=np.float32)
    rgb[..., 0] = y + 1.402 * cr
    rgb[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    rgb[..., 2] = y + 1.772 * cb
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class ChunkCache:
    """Decoded chunks (tiles or strips), bounded in bytes, least recent out."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._items: collections.OrderedDict[tuple, np.ndarray] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.capacity:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.size += value.nbytes
            while self.size > self.capacity:
                _, dropped = self._items.popitem(last=False)
                self.size -= dropped.nbytes


class FilePool:
    """Read-only descriptors of the files a slide spans, opened once each."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class ChunkedPage:
    """Region reads from one TIFF page through its strips or tiles.

    Pixels come back as (height, width, samples) in the page's dtype, with
    separate sample planes interleaved. Absent chunks are left to ``fill``.
    """

    def __init__(
        self,
        page: tifffile.TiffPage | tifffile.TiffFrame,
        files: FilePool,
        cache: ChunkCache,
        key: tuple,
    ) -> None:
        # A TiffFrame (an OME plane sharing its first page's tags) has its own
        # offsets; geometry, codec and tables come from its key frame.
        self.frame = page
        page = page.keyframe
        self.page = page
        self.files = files
        self.cache = cache
        self.key = key
        self.width = page.imagewidth
        self.height = page.imagelength
        self.samples = page.samplesperpixel
        self.separate = page.planarconfig == 2 and self.samples > 1
        self.planes = self.samples if self.separate else 1
        if page.is_tiled:
            self.chunk_height, self.chunk_width = page.tilelength, page.tilewidth
        else:
            self.chunk_height = min(page.rowsperstrip or self.height, self.height)
            self.chunk_width = self.width
        self.rows = math.ceil(self.height / self.chunk_height)
        self.cols = math.ceil(self.width / self.chunk_width)
        self.dtype = page.dtype
        self.ycbcr_jpeg2000 = page.compression == JPEG2000_YCBCR
        self.path = self.frame.parent.filehandle.path

    def chunk_bytes(self, index: int) -> bytes | None:
        """Return the stored bytes of one chunk, or None if it is absent."""
        offsets = self.frame.dataoffsets
        counts = self.frame.databytecounts
        if index >= len(offsets) or index >= len(counts):
            # A truncated file loses the end of its offset and byte-count tables.
            raise CorruptSlide(
                "the tile tables are shorter than the tile grid", "truncated"
            )
        offset, count = offsets[index], counts[index]
        if not offset or not count:
            return None
        data = os.pread(self.files.fd(self.path), count, offset)
        if len(data) != count:
            raise CorruptSlide("a tile or strip is truncated", "truncated")
        return data

    def chunk(self, plane: int, row: int, col: int) -> np.ndarray | None:
        """Return one decoded chunk as (rows, cols, samples of the chunk)."""
        index = (plane * self.rows + row) * self.cols + col
        key = (*self.key, index)
        pixels = self.cache.get(key)
        if pixels is not None:
            return pixels
        data = self.chunk_bytes(index)
        if data is None:
            return None
        page = self.page
        try:
            decoded, _, _ = page.decode(
                data,
                index,
                jpegtables=self.frame.jpegtables,
                jpegheader=page.jpegheader,
            )
        except Exception as error:  # codecs raise their own exception types
            raise CorruptSlide(
                f"tile or strip {index} cannot be decoded: {error}", "decode"
            ) from None
        if decoded is None:
            return None
        pixels = decoded.reshape(decoded.shape[-3], decoded.shape[-2], -1)
        if self.ycbcr_jpeg2000 and not jpeg2000_uses_colour_transform(data):
            pixels = ycbcr_to_rgb(pixels)
        self.cache.put(key, pixels)
        return pixels

    def region(self, x: int, y: int, width: int, height: int, fill: int) -> np.ndarray:
        """Return a rectangle of the page; area outside it or absent is ``fill``."""
        out = np.full((height, width, self.samples), fill, dtype=self.dtype)
        row0 = max(0, y // self.chunk_height)
        row1 = min(self.rows - 1, (y + height - 1) // self.chunk_height)
        col0 = max(0, x // self.chunk_width)
        col1 = min(self.cols - 1, (x + width - 1) // self.chunk_width)
        for plane in range(self.planes):
            for row in range(row0, row1 + 1):
                for col in range(col0, col1 + 1):
                    pixels = self.chunk(plane, row, col)
                    if pixels is None:
                        continue
                    chunk_x = col * self.chunk_width
                    chunk_y = row * self.chunk_height
                    left = max(x, chunk_x)
                    top = max(y, chunk_y)
                    right = min(x + width, chunk_x + pixels.shape[1], self.width)
                    bottom = min(y + height, chunk_y + pixels.shape[0], self.height)
                    if right <= left or bottom <= top:
                        continue
                    part = pixels[
                        top - chunk_y : bottom - chunk_y,
                        left - chunk_x : right - chunk_x,
                    ]
                    target = out[top - y : bottom - y, left - x : right - x]
                    if self.separate:
                        target[..., plane] = part[..., 0]
                    else:
                        target[...] = part
        return out


def associated_kind(series: tifffile.TiffPageSeries) -> str | None:
    """Name an associated image series: label, macro, thumbnail or None.

    Aperio and NDPI series carry names; other writers only say it in the
    ImageDescription or, for the Aperio macro, in NewSubfileType bit 3.
    """
    name = (series.name or "").strip().lower()
    if name in ("label", "macro", "thumbnail"):
        return name
    if name in ("overview", "map"):
        return "macro" if name == "overview" else "map"
    page = series.keyframe
    description = (page.description or "").strip().lower()
    first_word = description.split(maxsplit=1)[0] if description else ""
    for kind in ("label", "macro", "thumbnail"):
        if first_word == kind or f"\n{kind}" in description:
            return kind
    if page.subfiletype & 8:
        return "macro"
    return None


class TiffReader(SlideReader):
    """Tiled and strip-based TIFF: Aperio SVS (JPEG, JPEG 2000), NDPI, generic."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        try:
            self._tiff = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError) as e:
            raise UnsupportedSlide(f"not a readable TIFF: {e}") from None
        self._lock = threading.Lock()
        self._files = FilePool()
        self._cache = ChunkCache(CHUNK_CACHE_BYTES)
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        tiff = self._tiff
        if tiff.is_ome:
            raise UnsupportedSlide("OME-TIFF files are read by the OME-TIFF reader")
        # These vendors put overlapping tiles, several images per file or
        # levels in XML; OpenSlide assembles them, so its reader takes them.
        software = str(tiff.pages.first.tags.valueof("Software", ""))
        if (
            tiff.is_philips
            or tiff.is_scn
            or tiff.is_bif
            or software.startswith("MedScan")
        ):
            raise UnsupportedSlide("vendor TIFF is read through OpenSlide")
        try:
            series = tiff.series
        except Exception as error:  # tifffile raises many types on corrupt IFDs
            raise CorruptSlide(f"invalid TIFF structure: {error}") from None
        if not series:
            raise UnsupportedSlide("TIFF has no image series")
        base = series[0]
        pages = [level.keyframe for level in base.levels]
        level0 = pages[0]
        self._check_page(level0)
        self.ndpi = tiff.is_ndpi
        self._planes: list[ChunkedPage] = []
        self._native: list[bool] = []
        self.levels = []
        for index, page in enumerate(pages):
            if page.compression != level0.compression:
                continue
            plane = ChunkedPage(page, self._files, self._cache, (index,))
            native = (
                page.is_tiled
                and not self.ndpi
                and not plane.separate
                and NATIVE_TILE_RANGE[0] <= page.tilewidth <= NATIVE_TILE_RANGE[1]
                and NATIVE_TILE_RANGE[0] <= page.tilelength <= NATIVE_TILE_RANGE[1]
            )
            if native:
                tile_width, tile_height = page.tilewidth, page.tilelength
            else:
                tile_width = tile_height = VIRTUAL_TILE
            self._planes.append(plane)
            self._native.append(native)
            self.levels.append(
                Level(
                    page.imagewidth,
                    page.imagelength,
                    tile_width,
                    tile_height,
                    level0.imagewidth / page.imagewidth,
                )
            )
        self.samples = level0.samplesperpixel
        self.bits = 16 if level0.dtype == np.uint16 else 8
        self.compression = int(level0.compression)
        self._jpeg_passthrough = self.compression == JPEG and all(self._native)
        if self._jpeg_passthrough:
            self.passthrough_codec = "jpeg"
        elif self.compression == JPEG2000_RGB and all(self._native):
            self.passthrough_codec = "jpeg2000"
        self.lossy = self.compression in LOSSY
        if self.ndpi:
            self.format = "hamamatsu"
        elif tiff.is_svs:
            self.format = "aperio"
        else:
            self.format = "generic-tiff"
        self._associated: dict[str, tifffile.TiffPageSeries] = {}
        for other in series[1:]:
            kind = associated_kind(other)
            if kind is not None and kind not in self._associated:
                self._associated[kind] = other
        self._aperio: dict[str, str] = {}
        if tiff.is_svs:
            self._aperio = parse_aperio_description(level0.description)
        self._ndpi_tags: dict[str, object] = dict(level0.ndpi_tags or {})
        self.mpp = self._find_mpp(level0)

    @staticmethod
    def _check_page(page: tifffile.TiffPage) -> None:
        if page.compression not in SUPPORTED:
            raise recognised(
                UnsupportedSlide(
                    f"TIFF compression {int(page.compression)} is not supported"
                )
            )
        if page.dtype not in (np.uint8, np.uint16) or page.samplesperpixel not in (
            1,
            3,
            4,
        ):
            raise UnsupportedSlide(
                f"{page.samplesperpixel} samples of {page.bitspersample}-bit "
                f"{page.sampleformat.name.lower()} per pixel are not supported"
            )

    def _find_mpp(self, level0: tifffile.TiffPage) -> tuple[float, float] | None:
        value = self._aperio.get("MPP")
        if value is not None:
            try:
                mpp = float(value)
            except (TypeError, ValueError):
                mpp = 0.0
            if mpp > 0:
                return mpp, mpp
        return mpp_from_resolution(level0)

    @property
    def associated_images(self) -> Mapping[str, tuple[int, int]]:
        sizes = {}
        for name, series in self._associated.items():
            page = series.keyframe
            sizes[name] = (page.imagewidth, page.imagelength)
        return sizes

    @property
    def properties(self) -> Mapping[str, str]:
        kept = {
            f"aperio.{key}": str(value)
            for key, value in self._aperio.items()
            if key in APERIO_ALLOWED
        }
        for key, value in self._ndpi_tags.items():
            if key in NDPI_ALLOWED:
                kept[f"hamamatsu.{key}"] = str(value)
        kept["tiff.Compression"] = str(self.compression)
        return kept

    @property
    def withheld_properties(self) -> Mapping[str, str]:
        withheld = {
            f"aperio.{key}": str(value)
            for key, value in self._aperio.items()
            if key not in APERIO_ALLOWED
        }
        for key, value in self._ndpi_tags.items():
            if key not in NDPI_ALLOWED and key != "McuStarts":
                withheld[f"hamamatsu.{key}"] = str(value)[:200]
        tags = self._planes[0].page.tags
        for name in TEXT_TAGS:
            tag = tags.get(name)
            if tag is None or (name == "ImageDescription" and self._aperio):
                continue
            withheld[f"tiff.{name}"] = str(tag.value)[:200]
        return withheld

    def read_tile(self, level: int, col: int, row: int) -> Tile | None:
        info = self.levels[level]
        if not (0 <= col < info.tiles_across and 0 <= row < info.tiles_down):
            raise IndexError(f"tile {col},{row} outside level {level}")
        if self._native[level] and self.passthrough_codec is not None:
            plane = self._planes[level]
            data = plane.chunk_bytes(row * plane.cols + col)
            if data is None:
                return None
            if self.passthrough_codec == "jpeg2000":
                return Tile(
                    Codec.JPEG2000,
                    info.tile_width,
                    info.tile_height,
                    data,
                    self.samples,
                    8,
                )
            page = plane.page
            try:
                jpeg = jpeg_with_tables(
                    data, page.jpegtables, rgb=page.photometric == 2
                )
            except ValueError as error:
                raise CorruptSlide(
                    f"tile {col},{row} of level {level}: {error}", "invalid_jpeg"
                ) from None
            return Tile(
                Codec.JPEG, info.tile_width, info.tile_height, jpeg, self.samples, 8
            )
        pixels = self.read_tile_pixels(level, col, row)
        if pixels is None:
            return None
        return pack_raw(pixels)

    def read_tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        info = self.levels[level]
        if not (0 <= col < info.tiles_across and 0 <= row < info.tiles_down):
            raise IndexError(f"tile {col},{row} outside level {level}")
        plane = self._planes[level]
        if self._native[level]:
            pixels = plane.chunk(0, row, col)
            if pixels is None:
                return None
            if pixels.shape[:2] != (info.tile_height, info.tile_width):
                raise CorruptSlide(
                    f"tile {col},{row} of level {level} decodes to "
                    f"{pixels.shape[1]}x{pixels.shape[0]} pixels",
                    "decode",
                )
            return pixels
        return plane.region(
            col * info.tile_width,
            row * info.tile_height,
            info.tile_width,
            info.tile_height,
            self._fill(),
        )

    def _fill(self) -> int:
        return 65535 if self.bits == 16 else 255

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> np.ndarray:
        if self._native[level]:
            return super().read_region(level, x, y, width, height)
        return self._planes[level].region(x, y, width, height, self._fill())

    def read_associated(self, name: str) -> np.ndarray:
        series = self._associated[name]
        with self._lock:
            try:
                return series.asarray()
            except Exception as error:  # codecs raise their own exception types
                raise CorruptSlide(
                    f"{name} image cannot be decoded: {error}", "decode"
                ) from None

    def close(self) -> None:
        files = getattr(self, "_files", None)
        if files is not None:
            files.close()
        tiff = getattr(self, "_tiff", None)
        if tiff is not None:
            tiff.close()
