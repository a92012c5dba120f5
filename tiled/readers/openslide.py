"""Fallback reader for the formats only OpenSlide reads.

MIRAX (.mrxs), Leica SCN, Ventana BIF, Philips TIFF, Hamamatsu VMS/VMU,
Sakura SVSlide and Trestle are read through openslide-python with the
OpenSlide library from openslide-bin. OpenSlide assembles their tiles
(overlaps, stitching, several images per file), so the reader serves
virtual 512-pixel tiles cut with ``read_region`` and never passes stored
tiles through. It is the last reader tried.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from tiled.codecs import Tile, pack_raw
from tiled.errors import CorruptSlide, UnsupportedSlide
from tiled.readers.base import Level, SlideReader

VIRTUAL_TILE = 512

# OpenSlide property names shown to clients (OpenSlide 4 names). Vendor
# properties are withheld: they include barcodes, file names and dates.
OPENSLIDE_ALLOWED = frozenset(
    {
        "openslide.vendor",
        "openslide.mpp-x",
        "openslide.mpp-y",
        "openslide.objective-power",
        "openslide.level-count",
        "openslide.bounds-x",
        "openslide.bounds-y",
        "openslide.bounds-width",
        "openslide.bounds-height",
    }
)
ASSOCIATED_NAMES = {"label": "label", "macro": "macro", "thumbnail": "thumbnail"}


class OpenSlideReader(SlideReader):
    """Any slide OpenSlide detects, except the formats tiled reads itself."""

    # OpenSlide format names left to tiled's readers even when those reject
    # a file: tiled reads every layout OpenSlide reads in these formats.
    OWN_FORMATS = frozenset({"generic-tiff", "dicom"})

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        try:
            import openslide
        except ImportError:
            raise UnsupportedSlide("OpenSlide is not installed") from None
        vendor = openslide.OpenSlide.detect_format(self.path)
        if vendor is None:
            raise UnsupportedSlide("not a format OpenSlide reads")
        if vendor in self.OWN_FORMATS:
            raise UnsupportedSlide(f"{vendor} files are read by tiled's own reader")
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as error:
            raise CorruptSlide(f"OpenSlide cannot open the slide: {error}") from None
        self._error_type = openslide.OpenSlideError
        self.format = f"openslide-{vendor}"
        slide = self._slide
        base_width = slide.level_dimensions[0][0]
        self.levels = [
            Level(width, height, VIRTUAL_TILE, VIRTUAL_TILE, base_width / width)
            for width, height in slide.level_dimensions
        ]
        self.samples = 3
        self.bits = 8
        # OpenSlide formats store JPEG (or JPEG 2000) tiles, so tiles tiled
        # makes are JPEG-encoded too.
        self.lossy = True
        self.mpp = self._find_mpp()

    def _find_mpp(self) -> tuple[float, float] | None:
        properties = self._slide.properties
        try:
            mpp_x = float(properties["openslide.mpp-x"])
            mpp_y = float(properties["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None
        if mpp_x <= 0 or mpp_y <= 0:
            return None
        return mpp_x, mpp_y

    @property
    def associated_images(self) -> Mapping[str, tuple[int, int]]:
        images = self._slide.associated_images
        return {
            ASSOCIATED_NAMES[name]: images[name].size
            for name in images
            if name in ASSOCIATED_NAMES
        }

    def read_associated(self, name: str) -> np.ndarray:
        if name not in self.associated_images:
            raise KeyError(name)
        try:
            image = self._slide.associated_images[name]
        except self._error_type as error:
            raise CorruptSlide(f"{name} image cannot be read: {error}") from None
        return _flatten(np.asarray(image))

    @property
    def properties(self) -> Mapping[str, str]:
        return {
            key: value
            for key, value in self._slide.properties.items()
            if key in OPENSLIDE_ALLOWED
        }

    @property
    def withheld_properties(self) -> Mapping[str, str]:
        return {
            key: str(value)[:200]
            for key, value in self._slide.properties.items()
            if key not in OPENSLIDE_ALLOWED
        }

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> np.ndarray:
        downsample = self._slide.level_downsamples[level]
        # read_region takes the top-left corner in level-0 pixels.
        l0_x = int(round(x * downsample))
        l0_y = int(round(y * downsample))
        try:
            image = self._slide.read_region((l0_x, l0_y), level, (width, height))
        except self._error_type as error:
            raise CorruptSlide(
                f"region of level {level} cannot be read: {error}", "decode"
            ) from None
        return _flatten(np.asarray(image))

    def read_tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        info = self.levels[level]
        if not (0 <= col < info.tiles_across and 0 <= row < info.tiles_down):
            raise IndexError(f"tile {col},{row} outside level {level}")
        return self.read_region(
            level,
            col * VIRTUAL_TILE,
            row * VIRTUAL_TILE,
            VIRTUAL_TILE,
            VIRTUAL_TILE,
        )

    def read_tile(self, level: int, col: int, row: int) -> Tile | None:
        pixels = self.read_tile_pixels(level, col, row)
        return None if pixels is None else pack_raw(pixels)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()


def _flatten(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (unpremultiplied) over white, as RGB."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    flat = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return flat.astype(np.uint8)
