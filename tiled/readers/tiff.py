"""Reader of tiled TIFF pyramids: Aperio SVS and generic pyramidal TIFF/BigTIFF.

tifffile parses the container; tile bytes are read with ``os.pread`` so
threads never share a file position. JPEG tiles are passed through with the
file's JPEGTables merged in; other compressions are decoded by tifffile and
kept losslessly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import numpy as np
import tifffile

from tiled.codecs import Codec, Tile, jpeg_with_tables, pack_raw
from tiled.errors import CorruptSlide, UnsupportedSlide
from tiled.readers.base import Level, SlideReader

log = logging.getLogger("tiled.readers")

JPEG = 7
# Compressions whose tiles tifffile decodes and tiled keeps as zstd pixels.
LOSSLESS = {1, 5, 8, 32946, 50000, 34925, 32773}
ASSOCIATED_SERIES = {"label": "label", "macro": "macro", "thumbnail": "thumbnail"}

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

# Micrometres per TIFF ResolutionUnit: 2 is inch, 3 is centimetre.
MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0}


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
        # Writers that know no resolution often store 1 or 72 pixels per inch.
        if unit == 2 and pixels_per_unit in (1.0, 72.0, 96.0):
            return None
        values.append(MICRONS_PER_UNIT[unit] / pixels_per_unit)
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


class TiffReader(SlideReader):
    """Tiled TIFF pyramids: Aperio SVS (JPEG) and generic pyramidal TIFF."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        try:
            self._tiff = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError) as e:
            raise UnsupportedSlide(f"not a readable TIFF: {e}") from None
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        tiff = self._tiff
        try:
            series = tiff.series
        except Exception as error:  # tifffile raises many types on corrupt IFDs
            raise CorruptSlide(f"invalid TIFF structure: {error}") from None
        if not series:
            raise UnsupportedSlide("TIFF has no image series")
        base = series[0]
        pages = [level.keyframe for level in base.levels]
        level0 = pages[0]
        if not level0.is_tiled:
            raise UnsupportedSlide("TIFF level 0 is not tiled")
        if level0.compression not in LOSSLESS | {JPEG}:
            raise UnsupportedSlide(
                f"TIFF compression {int(level0.compression)} is not supported"
            )
        if level0.bitspersample != 8 or level0.samplesperpixel not in (1, 3, 4):
            raise UnsupportedSlide(
                f"{level0.samplesperpixel} samples of {level0.bitspersample} bits "
                "per pixel are not supported"
            )
        if level0.planarconfig != 1 and level0.samplesperpixel > 1:
            raise UnsupportedSlide("planar (separate) sample layout is not supported")
        self._pages: list[tifffile.TiffPage] = []
        self.levels = []
        for page in pages:
            if not page.is_tiled or page.compression != level0.compression:
                continue
            height, width = page.imagelength, page.imagewidth
            self._pages.append(page)
            self.levels.append(
                Level(
                    width,
                    height,
                    page.tilewidth,
                    page.tilelength,
                    level0.imagewidth / width,
                )
            )
        self.samples = level0.samplesperpixel
        self.bits = 8
        self._jpeg = level0.compression == JPEG
        self.passthrough_codec = "jpeg" if self._jpeg else None
        self.format = "aperio" if tiff.is_svs else "generic-tiff"
        self._associated = {
            ASSOCIATED_SERIES[s.name.lower()]: s
            for s in series[1:]
            if s.name and s.name.lower() in ASSOCIATED_SERIES
        }
        self._aperio = {}
        if tiff.is_svs:
            self._aperio = parse_aperio_description(level0.description)
        self.mpp = self._find_mpp(level0)

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
        return {name: (s.shape[1], s.shape[0]) for name, s in self._associated.items()}

    @property
    def properties(self) -> Mapping[str, str]:
        kept = {
            f"aperio.{key}": str(value)
            for key, value in self._aperio.items()
            if key in APERIO_ALLOWED
        }
        return kept

    @property
    def withheld_properties(self) -> Mapping[str, str]:
        withheld = {
            f"aperio.{key}": str(value)
            for key, value in self._aperio.items()
            if key not in APERIO_ALLOWED
        }
        if self._pages[0].description and not self._aperio:
            withheld["tiff.ImageDescription"] = self._pages[0].description[:200]
        return withheld

    def _tile_bytes(self, level: int, col: int, row: int) -> bytes | None:
        info = self.levels[level]
        if not (0 <= col < info.tiles_across and 0 <= row < info.tiles_down):
            raise IndexError(f"tile {col},{row} outside level {level}")
        page = self._pages[level]
        index = row * info.tiles_across + col
        offset = page.dataoffsets[index]
        count = page.databytecounts[index]
        if not offset or not count:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise CorruptSlide(f"tile {col},{row} of level {level} is truncated")
        return data

    def read_tile(self, level: int, col: int, row: int) -> Tile | None:
        info = self.levels[level]
        if self._jpeg:
            data = self._tile_bytes(level, col, row)
            if data is None:
                return None
            page = self._pages[level]
            try:
                jpeg = jpeg_with_tables(
                    data, page.jpegtables, rgb=page.photometric == 2
                )
            except ValueError as error:
                raise CorruptSlide(
                    f"tile {col},{row} of level {level}: {error}"
                ) from None
            return Tile(
                Codec.JPEG, info.tile_width, info.tile_height, jpeg, self.samples, 8
            )
        pixels = self.read_tile_pixels(level, col, row)
        if pixels is None:
            return None
        return pack_raw(pixels)

    def read_tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        data = self._tile_bytes(level, col, row)
        if data is None:
            return None
        page = self._pages[level]
        info = self.levels[level]
        index = row * info.tiles_across + col
        try:
            pixels, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:  # codecs raise their own exception types
            raise CorruptSlide(
                f"tile {col},{row} of level {level} cannot be decoded: {error}"
            ) from None
        if pixels is None:
            return None
        pixels = pixels.reshape(info.tile_height, info.tile_width, -1)
        return pixels

    def read_associated(self, name: str) -> np.ndarray:
        series = self._associated[name]
        with self._lock:
            try:
                return series.asarray()
            except Exception as error:  # codecs raise their own exception types
                raise CorruptSlide(f"{name} image cannot be decoded: {error}") from None

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)
        tiff = getattr(self, "_tiff", None)
        if tiff is not None:
            tiff.close()
