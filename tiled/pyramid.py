"""DeepZoom geometry and the making of tiles a source does not store.

Coordinate planes, each with its own prefix in names:

- ``t_``: tile column and row in a DeepZoom level;
- ``z_``: pixel in a DeepZoom level;
- ``l_``: pixel in a source slide level;
- ``l0_``: pixel in source level 0.

DeepZoom level ``z`` has downsample ``2 ** (z_count - 1 - z)`` against
source level 0 and size ``ceil(l0_size / downsample)``, so level 0 is 1x1
and the last level is full resolution.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np

from tiled import metrics
from tiled.codecs import (
    Codec,
    Tile,
    decode_jpeg,
    decode_tile,
    encode_jpeg,
    pack_raw,
    to_rgb8,
)
from tiled.errors import CorruptSlide
from tiled.readers.base import Level, SlideReader

log = logging.getLogger("tiled.pyramid")


@dataclasses.dataclass(frozen=True, slots=True)
class TileBox:
    """Bounds of one DeepZoom tile in its level, in z_ pixels (end exclusive)."""

    z_x0: int
    z_y0: int
    z_x1: int
    z_y1: int

    @property
    def width(self) -> int:
        return self.z_x1 - self.z_x0

    @property
    def height(self) -> int:
        return self.z_y1 - self.z_y0


class DeepZoomGeometry:
    """DeepZoom level sizes and tile grids of a slide, and their source levels."""

    def __init__(self, l_levels: list[Level], tile_size: int, overlap: int) -> None:
        if tile_size <= 0:
            raise ValueError("tile_size must be positive")
        self.tile_size = tile_size
        self.overlap = overlap
        l0_width, l0_height = l_levels[0].width, l_levels[0].height
        self.level_count = math.ceil(math.log2(max(l0_width, l0_height, 1))) + 1
        self.level_dimensions: list[tuple[int, int]] = []
        for z in range(self.level_count):
            downsample = 2 ** (self.level_count - 1 - z)
            self.level_dimensions.append(
                (math.ceil(l0_width / downsample), math.ceil(l0_height / downsample))
            )
        self.level_tiles = [
            (math.ceil(w / tile_size), math.ceil(h / tile_size))
            for w, h in self.level_dimensions
        ]
        # A DeepZoom level is cut straight from a source level whose size
        # matches it within a pixel (writers round level sizes either way).
        self.source_level: list[int | None] = []
        for z_width, z_height in self.level_dimensions:
            match = None
            for index, level in enumerate(l_levels):
                if (
                    abs(level.width - z_width) <= 1
                    and abs(level.height - z_height) <= 1
                ):
                    match = index
                    break
            self.source_level.append(match)

    def downsample(self, z: int) -> int:
        return 2 ** (self.level_count - 1 - z)

    def levels_below_full(self, z: int) -> int:
        return self.level_count - 1 - z

    def valid(self, z: int, t_col: int, t_row: int) -> bool:
        if not 0 <= z < self.level_count:
            return False
        cols, rows = self.level_tiles[z]
        return 0 <= t_col < cols and 0 <= t_row < rows

    def tile_box(self, z: int, t_col: int, t_row: int) -> TileBox:
        z_width, z_height = self.level_dimensions[z]
        size, overlap = self.tile_size, self.overlap
        z_x0 = t_col * size - (overlap if t_col else 0)
        z_y0 = t_row * size - (overlap if t_row else 0)
        z_x1 = min(z_width, (t_col + 1) * size + overlap)
        z_y1 = min(z_height, (t_row + 1) * size + overlap)
        return TileBox(z_x0, z_y0, z_x1, z_y1)

    def tiles_covering(
        self, z: int, z_x0: int, z_y0: int, z_x1: int, z_y1: int
    ) -> list[tuple[int, int]]:
        """Return (col, row) of the tiles whose core area meets a rectangle."""
        cols, rows = self.level_tiles[z]
        size = self.tile_size
        t_cols = range(max(0, z_x0 // size), min(cols, (z_x1 - 1) // size + 1))
        t_rows = range(max(0, z_y0 // size), min(rows, (z_y1 - 1) // size + 1))
        return [(c, r) for r in t_rows for c in t_cols]


def downsample_2x(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Halve an image by 2x2 area averaging to exactly (height, width).

    An odd edge is extended by its last row or column first, so the edge
    pixel averages itself instead of the background.
    """
    need_h, need_w = height * 2, width * 2
    h, w = pixels.shape[:2]
    if h < need_h or w < need_w:
        pixels = np.pad(
            pixels,
            ((0, max(0, need_h - h)), (0, max(0, need_w - w)), (0, 0)),
            mode="edge",
        )
    pixels = pixels[:need_h, :need_w]
    work = pixels.astype(np.uint32)
    summed = work[0::2, 0::2] + work[1::2, 0::2] + work[0::2, 1::2] + work[1::2, 1::2]
    return ((summed + 2) // 4).astype(pixels.dtype)


TileFetcher = Callable[[int, int, int], Tile]


def _white(dtype: np.dtype) -> int | float:
    """Return the largest value of a sample type, white for background."""
    if np.issubdtype(dtype, np.integer):
        return int(np.iinfo(dtype).max)
    return 1.0


def check_jpeg(data: bytes) -> None:
    """Raise CorruptSlide unless a stored JPEG tile decodes completely.

    The full decode runs only when a tile first enters the store, and unlike
    a marker scan it also catches damaged entropy-coded data.
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise CorruptSlide("stored JPEG tile has no SOI marker", "invalid_jpeg")
    try:
        decode_jpeg(data)
    except Exception as error:  # imagecodecs raises its own exception types
        raise CorruptSlide(
            f"stored JPEG tile cannot be decoded: {error}", "invalid_jpeg"
        ) from None


# Blank tiles by size and encoding; slides share them.
_BACKGROUND_TILES: dict[tuple, Tile] = {}


class TileMaker:
    """Makes DeepZoom tiles of one slide from its source and from finer tiles.

    ``fetch(z, col, row)`` returns a tile of another level through the
    cache, so a level the source lacks is built once from the level below.
    """

    def __init__(
        self,
        reader: SlideReader,
        geometry: DeepZoomGeometry,
        jpeg_quality: int,
        fetch: TileFetcher,
    ) -> None:
        self.reader = reader
        self.geometry = geometry
        self.jpeg_quality = jpeg_quality
        self.fetch = fetch
        self.lossy = reader.is_lossy

    def make(self, z: int, t_col: int, t_row: int) -> Tile:
        """Make one tile; a corrupt source tile fails this tile alone.

        The error is logged and counted, and nothing is returned for the
        store, so a later request tries the source again.
        """
        try:
            return self._make(z, t_col, t_row)
        except CorruptSlide as error:
            metrics.TILE_ERRORS.labels(error.reason).inc()
            log.warning(
                "tile %d/%d_%d of a %s slide failed: %s",
                z,
                t_col,
                t_row,
                self.reader.format,
                error,
            )
            raise

    def _make(self, z: int, t_col: int, t_row: int) -> Tile:
        geometry = self.geometry
        box = geometry.tile_box(z, t_col, t_row)
        source = geometry.source_level[z]
        if source is not None:
            passthrough = self._passthrough(source, z, t_col, t_row, box)
            if passthrough is not None:
                return passthrough
            pixels = self._read_source(source, z, box)
        else:
            pixels = self._from_finer(z, box)
        return self.encode(pixels)

    def encode(self, pixels: np.ndarray) -> Tile:
        """Encode made pixels: JPEG for lossy sources, zstd for lossless ones."""
        if not self.lossy:
            return pack_raw(pixels)
        height, width = pixels.shape[:2]
        rgb = self.reader.to_display(pixels)
        data = encode_jpeg(rgb, self.jpeg_quality)
        return Tile(Codec.JPEG, width, height, data, 3, 8)

    def _passthrough(
        self, source: int, z: int, t_col: int, t_row: int, box: TileBox
    ) -> Tile | None:
        level = self.reader.levels[source]
        geometry = self.geometry
        size = geometry.tile_size
        if not (
            self.reader.passthrough_codec == "jpeg"
            and geometry.overlap == 0
            and level.tile_width == size
            and level.tile_height == size
            and (level.width, level.height) == geometry.level_dimensions[z]
            and box.width == size
            and box.height == size
        ):
            return None
        tile = self.reader.read_tile(source, t_col, t_row)
        if tile is None:
            return self.background_tile(box.width, box.height)
        if tile.codec == Codec.JPEG:
            check_jpeg(tile.data)
        return tile

    def background_tile(self, width: int, height: int) -> Tile:
        """Return an encoded blank tile, made once per size and codec."""
        if type(self.reader).to_display is not SlideReader.to_display:
            # Display settings differ per slide, so the blank is not shared.
            return self.encode(self._background(width, height))
        key = (
            width,
            height,
            self.reader.samples,
            self.reader.bits,
            self.lossy,
            self.jpeg_quality,
        )
        tile = _BACKGROUND_TILES.get(key)
        if tile is None:
            tile = self.encode(self._background(width, height))
            _BACKGROUND_TILES[key] = tile
        return tile

    def _background(self, width: int, height: int) -> np.ndarray:
        dtype = np.uint16 if self.reader.bits == 16 else np.uint8
        fill = np.iinfo(dtype).max
        return np.full((height, width, self.reader.samples), fill, dtype=dtype)

    def _read_source(self, source: int, z: int, box: TileBox) -> np.ndarray:
        level = self.reader.levels[source]
        pixels = self.reader.read_region(
            source, box.z_x0, box.z_y0, box.width, box.height
        )
        # A source level one pixel smaller than the DeepZoom level leaves its
        # last row or column to the background; repeat the edge instead.
        missing_x = box.z_x1 - level.width
        missing_y = box.z_y1 - level.height
        if missing_x > 0 and box.width > missing_x:
            pixels[:, box.width - missing_x :] = pixels[
                :, box.width - missing_x - 1 : box.width - missing_x
            ]
        if missing_y > 0 and box.height > missing_y:
            pixels[box.height - missing_y :] = pixels[
                box.height - missing_y - 1 : box.height - missing_y
            ]
        return pixels

    def _from_finer(self, z: int, box: TileBox) -> np.ndarray:
        finer = z + 1
        f_width, f_height = self.geometry.level_dimensions[finer]
        f_x0, f_y0 = box.z_x0 * 2, box.z_y0 * 2
        f_x1, f_y1 = min(f_width, box.z_x1 * 2), min(f_height, box.z_y1 * 2)
        region = self.read_level_region(finer, f_x0, f_y0, f_x1, f_y1)
        return downsample_2x(region, box.width, box.height)

    def read_level_region(
        self, z: int, z_x0: int, z_y0: int, z_x1: int, z_y1: int
    ) -> np.ndarray:
        """Assemble a rectangle of DeepZoom level ``z`` from its tiles.

        Area no tile covers is white. Tiles normally share one sample type;
        if they do not, the region falls back to 8-bit RGB.
        """
        out = None
        for t_col, t_row in self.geometry.tiles_covering(z, z_x0, z_y0, z_x1, z_y1):
            tile_box = self.geometry.tile_box(z, t_col, t_row)
            pixels = decode_tile(self.fetch(z, t_col, t_row))
            if out is None:
                out = np.full(
                    (z_y1 - z_y0, z_x1 - z_x0, pixels.shape[2]),
                    _white(pixels.dtype),
                    dtype=pixels.dtype,
                )
            pixels = pixels[: tile_box.height, : tile_box.width]
            if pixels.shape[2] != out.shape[2] or pixels.dtype != out.dtype:
                pixels = to_rgb8(pixels)
                out = to_rgb8(out)
            left, top = max(z_x0, tile_box.z_x0), max(z_y0, tile_box.z_y0)
            right, bottom = min(z_x1, tile_box.z_x1), min(z_y1, tile_box.z_y1)
            out[top - z_y0 : bottom - z_y0, left - z_x0 : right - z_x0] = pixels[
                top - tile_box.z_y0 : bottom - tile_box.z_y0,
                left - tile_box.z_x0 : right - tile_box.z_x0,
            ]
        if out is None:
            dtype = np.uint16 if self.reader.bits == 16 else np.uint8
            out = np.full(
                (z_y1 - z_y0, z_x1 - z_x0, self.reader.samples),
                _white(dtype),
                dtype=dtype,
            )
        return out
