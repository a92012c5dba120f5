"""Reader of OME-TIFF: SubIFD pyramids, multichannel and 16-bit planes.

tifffile maps the OME-XML onto series, resolves multi-file sets and lists
SubIFD levels. tiled serves the first image (series) that is not a label,
macro or thumbnail, at its first Z plane and time point, with every channel
kept in the store at its source bit depth. ``to_display`` blends channels
into 8-bit RGB with one window and colour per channel.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping

import numpy as np
import tifffile

from tiled.codecs import Tile, pack_raw
from tiled.errors import CorruptSlide, UnsupportedSlide
from tiled.readers.base import Level, SlideReader, recognised
from tiled.readers.tiff import (
    LOSSY,
    NATIVE_TILE_RANGE,
    SUPPORTED,
    VIRTUAL_TILE,
    ChunkCache,
    ChunkedPage,
    FilePool,
)

# Default channel colours (RGB) for images whose OME-XML names none.
DEFAULT_COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (0, 255, 255),
    (255, 0, 255),
    (255, 255, 0),
    (255, 255, 255),
]
ASSOCIATED_NAMES = {
    "label": "label",
    "label image": "label",
    "macro": "macro",
    "macro image": "macro",
    "overview": "macro",
    "thumbnail": "thumbnail",
}
# Micrometres per OME length unit.
MICRONS_PER_UNIT = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "nm": 1e-3,
    "Å": 1e-4,
}
# Pixels sampled from the coarsest level to choose 16-bit display windows.
WINDOW_SAMPLE_EDGE = 1024


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_ome_image(xml: str, index: int) -> dict:
    """Return the Pixels attributes and Channel list of one OME Image."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise CorruptSlide(f"invalid OME-XML: {error}") from None
    images = [element for element in root if _local(element.tag) == "Image"]
    if index >= len(images):
        return {"pixels": {}, "channels": [], "image": {}}
    image = images[index]
    result: dict = {"image": dict(image.attrib), "pixels": {}, "channels": []}
    for child in image:
        name = _local(child.tag)
        if name == "AcquisitionDate":
            result["image"]["AcquisitionDate"] = child.text or ""
        elif name == "Description":
            result["image"]["Description"] = child.text or ""
        elif name == "Pixels":
            result["pixels"] = dict(child.attrib)
            result["channels"] = [
                dict(channel.attrib)
                for channel in child
                if _local(channel.tag) == "Channel"
            ]
    return result


def ome_colour(value: str) -> tuple[int, int, int] | None:
    """Decode an OME Color (signed 32-bit RGBA) to RGB; None for white/absent."""
    try:
        number = int(value) & 0xFFFFFFFF
    except (TypeError, ValueError):
        return None
    rgb = ((number >> 24) & 255, (number >> 16) & 255, (number >> 8) & 255)
    # Bio-Formats writes -1 (opaque white) when no colour was set.
    return None if rgb == (255, 255, 255) else rgb


class OmeTiffReader(SlideReader):
    """OME-TIFF images: pyramids in SubIFDs, channels blended for display."""

    format = "ome-tiff"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        try:
            self._tiff = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError) as e:
            raise UnsupportedSlide(f"not a readable TIFF: {e}") from None
        self._files = FilePool()
        self._cache = ChunkCache(64 << 20)
        self._lock = threading.Lock()
        try:
            if not self._tiff.is_ome:
                raise UnsupportedSlide("not an OME-TIFF")
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        tiff = self._tiff
        xml = tiff.ome_metadata or ""
        if "<BinaryOnly" in xml:
            raise recognised(
                UnsupportedSlide(
                    "this file holds planes of a multi-file OME-TIFF set; the "
                    "set is served from the file that holds its metadata"
                )
            )
        try:
            series_list = tiff.series
        except Exception as error:  # tifffile raises many types on bad OME-XML
            raise CorruptSlide(f"invalid OME-TIFF structure: {error}") from None
        main_index = None
        self._associated: dict[str, tifffile.TiffPageSeries] = {}
        for index, series in enumerate(series_list):
            kind = ASSOCIATED_NAMES.get((series.name or "").strip().lower())
            if kind is not None:
                self._associated.setdefault(kind, series)
            elif main_index is None:
                main_index = index
        if main_index is None:
            raise recognised(UnsupportedSlide("OME-TIFF holds no main image"))
        self.image_count = sum(
            1
            for s in series_list
            if ASSOCIATED_NAMES.get((s.name or "").strip().lower()) is None
        )
        series = series_list[main_index]
        self._ome = parse_ome_image(xml, main_index)
        self.axes = series.axes
        self.sizes = dict(zip(series.axes, series.shape, strict=True))
        keyframe = series.keyframe
        if keyframe.compression not in SUPPORTED:
            raise recognised(
                UnsupportedSlide(
                    f"TIFF compression {int(keyframe.compression)} is not supported"
                )
            )
        self._source_dtype = np.dtype(keyframe.dtype)
        if self._source_dtype.kind not in "iu" or self._source_dtype.itemsize > 2:
            raise recognised(
                UnsupportedSlide(
                    f"OME pixel type {self._source_dtype.name} is not supported; "
                    "tiled keeps 8- and 16-bit integer samples"
                )
            )
        self.bits = self._source_dtype.itemsize * 8
        self.lossy = keyframe.compression in LOSSY
        channels_per_page = keyframe.samplesperpixel
        self._open_levels(series)
        self.samples = len(self._planes[0]) * channels_per_page
        self.rgb = (
            self.samples == 3
            and channels_per_page == 3
            and keyframe.photometric == 2
            and self.bits == 8
        )
        self.mpp = self._find_mpp()
        self._colours = self._channel_colours(keyframe.photometric == 2)
        self._windows = self._display_windows()

    def _open_levels(self, series: tifffile.TiffPageSeries) -> None:
        """Find each level's page of every channel, at the first Z and T."""
        page_axes = [axis for axis in series.axes if axis not in "YXS"]
        self._planes: list[list[ChunkedPage]] = []
        self.levels = []
        for level_index, level in enumerate(series.levels):
            pages = level.pages
            shape = [
                dict(zip(level.axes, level.shape, strict=True))[a] for a in page_axes
            ]
            planes = []
            for channel in range(self.sizes.get("C", 1)):
                position = [channel if axis == "C" else 0 for axis in page_axes]
                page_index = int(np.ravel_multi_index(position, shape)) if shape else 0
                page = pages[page_index] if page_index < len(pages) else None
                if page is None:
                    raise CorruptSlide(
                        f"plane of channel {channel} is missing from level "
                        f"{level_index}"
                    )
                planes.append(
                    ChunkedPage(page, self._files, self._cache, (level_index, channel))
                )
            first = planes[0]
            width, height = first.width, first.height
            if (
                first.page.is_tiled
                and NATIVE_TILE_RANGE[0] <= first.chunk_width <= NATIVE_TILE_RANGE[1]
                and NATIVE_TILE_RANGE[0] <= first.chunk_height <= NATIVE_TILE_RANGE[1]
            ):
                tile_width, tile_height = first.chunk_width, first.chunk_height
            else:
                tile_width = tile_height = VIRTUAL_TILE
            self._planes.append(planes)
            self.levels.append(
                Level(
                    width,
                    height,
                    tile_width,
                    tile_height,
                    self._planes[0][0].width / width,
                )
            )

    def _find_mpp(self) -> tuple[float, float] | None:
        pixels = self._ome["pixels"]
        values = []
        for axis in ("X", "Y"):
            size = pixels.get(f"PhysicalSize{axis}")
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            if size is None or unit not in MICRONS_PER_UNIT:
                return None
            try:
                microns = float(size) * MICRONS_PER_UNIT[unit]
            except ValueError:
                return None
            if microns <= 0:
                return None
            values.append(microns)
        return values[0], values[1]

    def _channel_colours(self, photometric_rgb: bool) -> list[tuple[int, int, int]]:
        if self.samples == 1:
            return [(255, 255, 255)]
        if self.samples == 3 and photometric_rgb:
            return [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
        colours = []
        described = self._ome["channels"]
        for index in range(self.samples):
            colour = None
            if index < len(described):
                colour = ome_colour(described[index].get("Color", ""))
            colours.append(colour or DEFAULT_COLOURS[index % len(DEFAULT_COLOURS)])
        return colours

    def _display_windows(self) -> list[tuple[float, float]]:
        """Choose each channel's display window (low, high) in stored values.

        8-bit RGB uses the full range. Otherwise SignificantBits sets the
        range where the OME-XML states it; failing that the 0.1 and 99.9
        percentiles of a sample of the coarsest level are used.
        """
        if self.rgb:
            return [(0.0, 255.0)] * 3
        significant = self._ome["pixels"].get("SignificantBits")
        if significant and significant.isdigit() and int(significant) < self.bits:
            return [(0.0, float(2 ** int(significant) - 1))] * self.samples
        level = len(self.levels) - 1
        info = self.levels[level]
        width = min(info.width, WINDOW_SAMPLE_EDGE)
        height = min(info.height, WINDOW_SAMPLE_EDGE)
        # NOTE: only a central window of at most 1024x1024 pixels of the
        # coarsest level is sampled, so a single-level image with signal
        # only near its edges may get a window that clips it.
        x = (info.width - width) // 2
        y = (info.height - height) // 2
        try:
            sample = self.read_region(level, x, y, width, height)
        except CorruptSlide:
            maximum = float(2**self.bits - 1)
            return [(0.0, maximum)] * self.samples
        windows = []
        for channel in range(self.samples):
            values = sample[..., channel]
            low, high = np.percentile(values, (0.1, 99.9))
            if high <= low:
                high = low + 1
            windows.append((float(low), float(high)))
        return windows

    def to_display(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.rgb and pixels.dtype == np.uint8 and pixels.shape[2] == 3:
            return pixels
        out = np.zeros(pixels.shape[:2] + (3,), dtype=np.float32)
        count = min(pixels.shape[2], len(self._windows))
        for channel in range(count):
            low, high = self._windows[channel]
            scaled = (pixels[..., channel].astype(np.float32) - low) / (high - low)
            np.clip(scaled, 0.0, 1.0, out=scaled)
            colour = np.asarray(self._colours[channel], dtype=np.float32)
            out += scaled[..., None] * colour
        return np.clip(out, 0, 255).astype(np.uint8)

    def _to_unsigned(self, pixels: np.ndarray) -> np.ndarray:
        """Shift signed samples to unsigned (int8 -128 becomes 0), native order."""
        dtype = self._source_dtype
        if dtype.kind == "i":
            offset = 1 << (dtype.itemsize * 8 - 1)
            unsigned = np.uint8 if dtype.itemsize == 1 else np.uint16
            return (pixels.astype(np.int32) + offset).astype(unsigned)
        return pixels.astype(dtype.newbyteorder("="), copy=False)

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> np.ndarray:
        parts = []
        for plane in self._planes[level]:
            # Absent area is black, the background of fluorescence images.
            region = plane.region(x, y, width, height, 0)
            parts.append(self._to_unsigned(region))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=2)

    def read_tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        info = self.levels[level]
        if not (0 <= col < info.tiles_across and 0 <= row < info.tiles_down):
            raise IndexError(f"tile {col},{row} outside level {level}")
        return self.read_region(
            level,
            col * info.tile_width,
            row * info.tile_height,
            info.tile_width,
            info.tile_height,
        )

    def read_tile(self, level: int, col: int, row: int) -> Tile | None:
        pixels = self.read_tile_pixels(level, col, row)
        return None if pixels is None else pack_raw(pixels)

    @property
    def associated_images(self) -> Mapping[str, tuple[int, int]]:
        sizes = {}
        for name, series in self._associated.items():
            page = series.keyframe
            sizes[name] = (page.imagewidth, page.imagelength)
        return sizes

    def read_associated(self, name: str) -> np.ndarray:
        series = self._associated[name]
        with self._lock:
            try:
                pixels = series.asarray()
            except Exception as error:  # codecs raise their own exception types
                raise CorruptSlide(
                    f"{name} image cannot be decoded: {error}", "decode"
                ) from None
        if series.axes.startswith("C") and pixels.ndim == 3:
            pixels = np.moveaxis(pixels, 0, -1)
        return pixels

    @property
    def channels(self) -> list[dict]:
        """Display settings of each stored channel, in store order."""
        return [
            {
                "index": index,
                "color": "#{:02x}{:02x}{:02x}".format(*self._colours[index]),
                "window": list(self._windows[index]),
            }
            for index in range(self.samples)
        ]

    @property
    def properties(self) -> Mapping[str, str]:
        pixels = self._ome["pixels"]
        kept = {
            f"ome.{key}": pixels[key]
            for key in (
                "Type",
                "SizeX",
                "SizeY",
                "SizeZ",
                "SizeC",
                "SizeT",
                "DimensionOrder",
                "PhysicalSizeX",
                "PhysicalSizeXUnit",
                "PhysicalSizeY",
                "PhysicalSizeYUnit",
                "SignificantBits",
            )
            if key in pixels
        }
        kept["ome.images"] = str(self.image_count)
        kept["ome.served_plane"] = "first Z plane, first time point"
        if self._source_dtype.kind == "i":
            offset = 1 << (self.bits - 1)
            kept["ome.sample_offset"] = f"{offset} added to signed samples"
        for channel in self.channels:
            index = channel["index"]
            kept[f"ome.channel.{index}.color"] = channel["color"]
            low, high = channel["window"]
            kept[f"ome.channel.{index}.window"] = f"{low:g}-{high:g}"
        return kept

    @property
    def withheld_properties(self) -> Mapping[str, str]:
        image = self._ome["image"]
        withheld = {
            f"ome.Image.{key}": str(value)[:200]
            for key, value in image.items()
            if key != "ID"
        }
        for index, channel in enumerate(self._ome["channels"]):
            if "Name" in channel:
                withheld[f"ome.channel.{index}.Name"] = channel["Name"][:200]
        return withheld

    def close(self) -> None:
        files = getattr(self, "_files", None)
        if files is not None:
            files.close()
        tiff = getattr(self, "_tiff", None)
        if tiff is not None:
            tiff.close()
