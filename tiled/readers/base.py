"""The reader interface every slide format implements.

Coordinates follow the slide's own pyramid: level 0 is full resolution, a
level's ``downsample`` is level 0's width over that level's width, and a
tile address is (col, row) in that level's tile grid.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping

import numpy as np

from tiled.codecs import Tile, to_rgb8

BACKGROUND = 255


def recognised(error: Exception) -> Exception:
    """Mark a rejection as final: the reader knows the format and no other
    reader should try the file, so open_slide reports this reason alone."""
    error.recognised = True  # type: ignore[attr-defined]
    return error


@dataclasses.dataclass(frozen=True, slots=True)
class Level:
    """One pyramid level of a source slide, in pixels of that level."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float

    @property
    def tiles_across(self) -> int:
        return math.ceil(self.width / self.tile_width)

    @property
    def tiles_down(self) -> int:
        return math.ceil(self.height / self.tile_height)


@dataclasses.dataclass(frozen=True, slots=True)
class SourceIdentity:
    """The stat fields of a source file whose change means it must be reopened.

    Inode and ctime are here so a file replaced by one with the same size and
    restored mtime (``cp -p``, ``rsync -a``) is noticed. The store keeps only
    path, size, mtime and a content fingerprint (see ``fingerprint``), so a
    store copied with its slides to another disk stays valid.
    """

    path: str
    size: int
    mtime_ns: int
    inode: int = 0
    ctime_ns: int = 0

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> SourceIdentity:
        status = os.stat(path)
        return cls(
            os.fspath(path),
            status.st_size,
            status.st_mtime_ns,
            status.st_ino,
            status.st_ctime_ns,
        )


# Bytes read from each end of a file for its fingerprint. TIFF and DICOM keep
# their headers and first directories there, so two different slides of equal
# size and mtime differ in them.
FINGERPRINT_BYTES = 64 << 10


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Return a hash of the size and the first and last 64 KiB of a file."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(file.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            file.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(file.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


class SlideReader(abc.ABC):
    """An open source slide.

    Readers are used from several threads at once, so reads must not share a
    file position: implementations read with ``os.pread``.
    """

    #: Short format name shown to clients, e.g. "aperio" or "generic-tiff".
    format: str = ""
    #: Level list, finest first.
    levels: list[Level]
    #: Microns per pixel at level 0 as (x, y), or None where the file states none.
    mpp: tuple[float, float] | None = None
    #: Samples per pixel and bits per sample of the stored pixels.
    samples: int = 3
    bits: int = 8
    #: Codec of stored tiles that ``read_tile`` returns as-is, or None when
    #: tiles are decoded and kept losslessly.
    passthrough_codec: str | None = None
    #: True when the source is lossy, so tiles tiled makes are JPEG-encoded;
    #: None takes it from ``passthrough_codec``.
    lossy: bool | None = None
    #: Names of the associated images shown to any client; label and macro
    #: images can show patient data and are served only where configured.
    SERVED_ASSOCIATED = frozenset({"thumbnail"})

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.identity = SourceIdentity.of(path)

    @property
    def is_lossy(self) -> bool:
        if self.lossy is not None:
            return self.lossy
        return self.passthrough_codec is not None

    def to_display(self, pixels: np.ndarray) -> np.ndarray:
        """Render stored pixels as 8-bit RGB for JPEG or PNG tiles.

        Readers of multichannel or high-bit-depth data override this to apply
        their channel windows and colours; the store keeps the source values.
        """
        return to_rgb8(pixels)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    @property
    def associated_images(self) -> Mapping[str, tuple[int, int]]:
        """Names of label, macro and thumbnail images mapped to (width, height)."""
        return {}

    @property
    def properties(self) -> Mapping[str, str]:
        """Metadata safe to show clients (passed through an allow-list)."""
        return {}

    @property
    def withheld_properties(self) -> Mapping[str, str]:
        """Metadata found in the file but not shown to clients, for ``tiled info``."""
        return {}

    @abc.abstractmethod
    def read_tile(self, level: int, col: int, row: int) -> Tile | None:
        """Return the stored tile as encoded in the file, or None if it is absent.

        A tile that can be passed through is returned in its stored codec,
        made standalone; others come back as decoded pixels packed losslessly.
        """

    @abc.abstractmethod
    def read_tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        """Return the full stored tile's pixels (tile_height, tile_width, samples)."""

    def read_associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> np.ndarray:
        """Return pixels of a rectangle of one level; area outside it is background."""
        info = self.levels[level]
        dtype = np.uint16 if self.bits == 16 else np.uint8
        fill = np.iinfo(dtype).max
        out = np.full((height, width, self.samples), fill, dtype=dtype)
        col0 = max(0, x // info.tile_width)
        row0 = max(0, y // info.tile_height)
        col1 = min(info.tiles_across - 1, (x + width - 1) // info.tile_width)
        row1 = min(info.tiles_down - 1, (y + height - 1) // info.tile_height)
        for row in range(row0, row1 + 1):
            for col in range(col0, col1 + 1):
                pixels = self.read_tile_pixels(level, col, row)
                if pixels is None:
                    continue
                tile_x = col * info.tile_width
                tile_y = row * info.tile_height
                # Clip the tile to the level, then to the requested rectangle.
                left = max(x, tile_x)
                top = max(y, tile_y)
                right = min(x + width, tile_x + info.tile_width, info.width)
                bottom = min(y + height, tile_y + info.tile_height, info.height)
                if right <= left or bottom <= top:
                    continue
                out[top - y : bottom - y, left - x : right - x] = pixels[
                    top - tile_y : bottom - tile_y, left - tile_x : right - tile_x
                ]
        return out

    def close(self) -> None:  # noqa: B027 - readers without handles need nothing
        pass

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
