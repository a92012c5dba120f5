"""Tile codecs: standalone JPEG assembly, encoding and lossless packing.

A stored tile value is a 7-byte header followed by the payload:
codec id (u8), width (u16), height (u16), samples per pixel (u8) and bits per
sample (u8), all big-endian. Codec ids never change meaning once written.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np
import simplejpeg
import zstandard

HEADER = struct.Struct(">BHHBB")

# Adobe APP14 segment with transform 0: the three components are RGB, not
# YCbCr. libjpeg and every browser decoder honour it.
ADOBE_APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"


class Codec(enum.IntEnum):
    """Codec of a stored tile value's payload."""

    JPEG = 1
    # Raw samples, row-major, interleaved, compressed with zstd.
    ZSTD = 2
    PNG = 3
    JPEG2000 = 4
    WEBP = 5

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Tile:
    """One encoded tile and what its payload contains."""

    codec: Codec
    width: int
    height: int
    data: bytes
    samples: int = 3
    bits: int = 8

    def pack(self) -> bytes:
        """Return the store value: header and payload."""
        header = HEADER.pack(
            self.codec, self.width, self.height, self.samples, self.bits
        )
        return header + self.data

    @classmethod
    def unpack(cls, value: bytes | memoryview) -> Tile:
        codec, width, height, samples, bits = HEADER.unpack_from(value)
        return cls(
            Codec(codec), width, height, bytes(value[HEADER.size :]), samples, bits
        )


def jpeg_with_tables(tile: bytes, tables: bytes | None, rgb: bool) -> bytes:
    """Make a standalone JPEG from a TIFF tile and the file's JPEGTables.

    The tables tag is an abbreviated JPEG (SOI, DQT/DHT segments, EOI); its
    segments go right after the tile's SOI. With ``rgb`` (TIFF photometric
    RGB) an Adobe APP14 marker is inserted, unless the tile already declares
    its colour encoding, so decoders do not treat the components as YCbCr.
    """
    if tile[:2] != SOI:
        raise ValueError("tile does not start with a JPEG SOI marker")
    parts = [SOI]
    if rgb and not declares_colour_transform(tile):
        parts.append(ADOBE_APP14_RGB)
    if tables:
        body = tables
        if body[:2] == SOI:
            body = body[2:]
        if body[-2:] == EOI:
            body = body[:-2]
        parts.append(body)
    parts.append(tile[2:])
    return b"".join(parts)


def _app_segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """Return (marker, first bytes) of the APPn segments before the first scan."""
    segments = []
    position = 2
    while position + 4 <= len(jpeg):
        if jpeg[position] != 0xFF:
            break
        marker = jpeg[position + 1]
        if marker == 0xDA:
            break
        length = int.from_bytes(jpeg[position + 2 : position + 4], "big")
        if 0xE0 <= marker <= 0xEF:
            segments.append((marker, jpeg[position + 4 : position + 9]))
        position += 2 + length
    return segments


def has_adobe_marker(jpeg: bytes) -> bool:
    """Return True if a JPEG carries an Adobe APP14 segment before its scan."""
    return (0xEE, b"Adobe") in _app_segments(jpeg)


def declares_colour_transform(jpeg: bytes) -> bool:
    """Return True if a JFIF or Adobe segment declares the colour encoding.

    libjpeg reads JFIF as YCbCr and follows the Adobe transform flag; a tile
    with either must be left as it is.
    """
    segments = _app_segments(jpeg)
    return (0xE0, b"JFIF\x00") in segments or (0xEE, b"Adobe") in segments


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Encode 8-bit RGB or grey pixels as baseline JPEG."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] == 1:
        return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="GRAY")
    return simplejpeg.encode_jpeg(
        pixels, quality=quality, colorspace="RGB", colorsubsampling="420"
    )


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode a JPEG to an RGB uint8 array (height, width, 3).

    libjpeg-turbo, through imagecodecs, honours the Adobe APP14 transform flag,
    so RGB-encoded tiles come out right.
    """
    pixels = imagecodecs.jpeg8_decode(data)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode pixels as PNG with fast compression (tiles are served, not archived)."""
    return imagecodecs.png_encode(np.ascontiguousarray(pixels), level=1)


def encode_webp(pixels: np.ndarray, quality: int) -> bytes:
    return imagecodecs.webp_encode(np.ascontiguousarray(pixels), level=quality)


_ZSTD_LEVEL = 3


def pack_raw(pixels: np.ndarray) -> Tile:
    """Compress pixels losslessly for the store."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, samples = pixels.shape
    bits = pixels.dtype.itemsize * 8
    if pixels.dtype.byteorder == "<" or (
        pixels.dtype.byteorder == "=" and np.little_endian and bits > 8
    ):
        pixels = pixels.astype(pixels.dtype.newbyteorder(">"))
    data = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(pixels.tobytes())
    return Tile(Codec.ZSTD, width, height, data, samples, bits)


def unpack_raw(tile: Tile) -> np.ndarray:
    """Return the pixels of a ZSTD tile as (height, width, samples)."""
    raw = zstandard.ZstdDecompressor().decompress(tile.data)
    dtype = np.dtype(">u2") if tile.bits == 16 else np.dtype(np.uint8)
    pixels = np.frombuffer(raw, dtype=dtype).reshape(
        tile.height, tile.width, tile.samples
    )
    if tile.bits == 16:
        pixels = pixels.astype(np.uint16)
    return pixels


def decode_tile(tile: Tile) -> np.ndarray:
    """Return the pixels of any stored tile as (height, width, samples)."""
    if tile.codec == Codec.ZSTD:
        return unpack_raw(tile)
    if tile.codec == Codec.JPEG:
        return decode_jpeg(tile.data)
    if tile.codec == Codec.PNG:
        pixels = imagecodecs.png_decode(tile.data)
    elif tile.codec == Codec.JPEG2000:
        pixels = imagecodecs.jpeg2k_decode(tile.data)
    elif tile.codec == Codec.WEBP:
        pixels = imagecodecs.webp_decode(tile.data)
    else:
        raise ValueError(f"unknown codec {tile.codec}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Convert grey, grey+alpha, RGBA or 16-bit pixels to 8-bit RGB for display."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.dtype != np.uint8:
        if pixels.dtype == np.uint16:
            pixels = (pixels >> 8).astype(np.uint8)
        else:
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    samples = pixels.shape[2]
    if samples == 1:
        return np.repeat(pixels, 3, axis=2)
    if samples == 2:
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    if samples >= 4:
        return np.ascontiguousarray(pixels[:, :, :3])
    return pixels
