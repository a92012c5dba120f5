"""Synthetic slides for the demo, tests and benchmarks.

The texture imitates H&E staining: white glass around blob-shaped tissue,
pink stroma of varying density and purple nuclei. Pixels are a pure function
of level-0 coordinates, so any tile of any level is made without holding the
whole image, and a 30000-pixel slide takes seconds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import simplejpeg
import tifffile
from PIL import Image, ImageDraw

GLASS = np.array([242, 240, 244], dtype=np.float32)
STROMA = np.array([232, 160, 196], dtype=np.float32)
DENSE_STROMA = np.array([205, 105, 160], dtype=np.float32)
NUCLEUS = np.array([92, 58, 140], dtype=np.float32)

# Level-0 pixels per cell of the low-resolution noise fields.
FIELD_CELL = 512
# Level-0 pixels per nucleus cell; each cell contains at most one nucleus.
NUCLEUS_CELL = 18


def _hash(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Return deterministic pseudo-random values in [0, 1) for integer pairs."""
    x = (a.astype(np.uint64) * np.uint64(0x9E3779B1)) ^ (
        b.astype(np.uint64) * np.uint64(0x85EBCA77)
    )
    x ^= np.uint64(seed * 0x27D4EB2F + 1)
    x ^= x >> np.uint64(15)
    x *= np.uint64(0x2C1B3C6D)
    x ^= x >> np.uint64(12)
    x *= np.uint64(0x297A2D39)
    x ^= x >> np.uint64(15)
    return (x & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(0x1000000)


def _smooth_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Bilinear value noise on a grid of ``cell`` pixels, smoothstep blended."""
    gx, gy = x / cell, y / cell
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    v00 = _hash(ix, iy, seed)
    v10 = _hash(ix + 1, iy, seed)
    v01 = _hash(ix, iy + 1, seed)
    v11 = _hash(ix + 1, iy + 1, seed)
    top = v00 + (v10 - v00) * fx
    bottom = v01 + (v11 - v01) * fx
    return top + (bottom - top) * fy


def _field(
    x0: float,
    y0: float,
    width: int,
    height: int,
    downsample: float,
    cell: float,
    seed: int,
) -> np.ndarray:
    """Sample smooth noise on a coarse grid and enlarge it bilinearly."""
    step = 8
    coarse_w, coarse_h = width // step + 2, height // step + 2
    xs = x0 + np.arange(coarse_w, dtype=np.float32) * step * downsample
    ys = y0 + np.arange(coarse_h, dtype=np.float32) * step * downsample
    x, y = np.meshgrid(xs, ys)
    coarse = _smooth_noise(x, y, cell, seed).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize(
        (coarse_w * step, coarse_h * step), Image.Resampling.BILINEAR
    )
    return np.asarray(image)[
        step // 2 : step // 2 + height, step // 2 : step // 2 + width
    ]


def tissue_pixels(
    l0_x: int,
    l0_y: int,
    width: int,
    height: int,
    downsample: float,
    seed: int = 7,
    slide_width: int = 0,
    slide_height: int = 0,
) -> np.ndarray:
    """Return an RGB uint8 (height, width, 3) patch of the synthetic texture.

    The patch starts at level-0 pixel (l0_x, l0_y) and samples every
    ``downsample`` level-0 pixels. Pixels beyond the slide size are glass.
    """
    x0 = l0_x + 0.5 * downsample
    y0 = l0_y + 0.5 * downsample
    shape = (
        _field(x0, y0, width, height, downsample, FIELD_CELL * 4, seed) * 0.6
        + _field(x0, y0, width, height, downsample, FIELD_CELL, seed + 1) * 0.3
        + _field(x0, y0, width, height, downsample, FIELD_CELL / 4, seed + 2) * 0.1
    )
    tissue = np.clip((shape - 0.42) * 12, 0, 1)
    density = _field(x0, y0, width, height, downsample, FIELD_CELL / 2, seed + 3)
    stroma = STROMA + (DENSE_STROMA - STROMA) * density[..., None]
    colour = GLASS + (stroma - GLASS) * tissue[..., None]

    # Nuclei: one jittered disc per cell, more where the stroma is dense.
    # Per-cell values are hashed on the small cell grid, then looked up.
    xs = x0 + np.arange(width, dtype=np.float32) * downsample
    ys = y0 + np.arange(height, dtype=np.float32) * downsample
    cell_x = np.floor(xs / NUCLEUS_CELL).astype(np.int64)
    cell_y = np.floor(ys / NUCLEUS_CELL).astype(np.int64)
    grid_x, grid_y = np.meshgrid(
        np.arange(cell_x[0], cell_x[-1] + 1), np.arange(cell_y[0], cell_y[-1] + 1)
    )
    centre_x = (grid_x + 0.35 + 0.3 * _hash(grid_x, grid_y, seed + 4)) * NUCLEUS_CELL
    centre_y = (grid_y + 0.35 + 0.3 * _hash(grid_x, grid_y, seed + 5)) * NUCLEUS_CELL
    chance = _hash(grid_x, grid_y, seed + 6)
    radius = 3.5 + 2.5 * _hash(grid_x, grid_y, seed + 8)
    index_y = (cell_y - cell_y[0])[:, None]
    index_x = (cell_x - cell_x[0])[None, :]
    distance = np.hypot(
        xs[None, :] - centre_x[index_y, index_x],
        ys[:, None] - centre_y[index_y, index_x],
    )
    present = chance[index_y, index_x] < (0.15 + 0.6 * density) * tissue
    # Soft edges keep downsampled levels from aliasing too harshly.
    edge = np.clip(
        radius[index_y, index_x] - distance + 0.5 * max(1.0, downsample / 4), 0, 1
    )
    colour = colour + (NUCLEUS - colour) * (edge * present)[..., None]

    grain = np.random.default_rng((seed, l0_x, l0_y, int(downsample))).random(
        (height, width), dtype=np.float32
    )
    colour += (grain[..., None] - 0.5) * 10
    if slide_width and slide_height:
        colour[:, xs >= slide_width] = 255
        colour[ys >= slide_height, :] = 255
    return np.clip(colour, 0, 255).astype(np.uint8)


def _label_image(text: str) -> np.ndarray:
    image = Image.new("RGB", (400, 300), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 390, 290), outline=(0, 0, 0), width=3)
    for line_number, line in enumerate(text.splitlines()):
        draw.text((30, 40 + 30 * line_number), line, fill=(0, 0, 0))
    return np.asarray(image)


def write_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    tile_size: int = 256,
    downsamples: tuple[int, ...] = (1, 4, 16),
    compression: str = "jpeg",
    quality: int = 90,
    aperio: bool = False,
    label_text: str | None = None,
    sparse_every: int = 0,
    mpp: float | None = 0.25,
    seed: int = 7,
) -> str:
    """Write a tiled pyramidal TIFF (or Aperio-like SVS) of the synthetic texture.

    ``compression`` is "jpeg" (tiles stored as standalone YCbCr JPEGs) or a
    lossless tifffile codec name such as "zlib", "lzw" or "zstd".
    ``sparse_every`` keeps only every n-th tile of level 0 and leaves the
    others absent (offset and byte count 0). With ``label_text``, label and
    macro images showing that text are added.
    """
    path = os.fspath(path)
    bigtiff = width * height * 3 > 2**31
    resolution = None
    if mpp:
        pixels_per_cm = 10000.0 / mpp
        resolution = (pixels_per_cm, pixels_per_cm)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        for index, downsample in enumerate(downsamples):
            level_width = math.ceil(width / downsample)
            level_height = math.ceil(height / downsample)
            if index and (level_width < 16 or level_height < 16):
                break
            description = None
            if aperio:
                description = (
                    "Aperio Image Library v12.0.15 \r\n"
                    f"{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size})"
                    f" JPEG/RGB Q={quality}"
                    if index == 0
                    else f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> "
                    f"{level_width}x{level_height} - ({tile_size}x{tile_size})"
                )
                if index == 0:
                    description += (
                        f"|AppMag = 40|MPP = {mpp or 0.25}"
                        "|Filename = DOE^JANE 1970-01-01|User = jdoe"
                        "|Title = Biopsy of Jane Doe|Date = 12/04/26|Time = 10:00:00"
                    )
            tiles = _level_tiles(
                width,
                height,
                level_width,
                level_height,
                tile_size,
                downsample,
                compression,
                quality,
                sparse_every if index == 0 else 0,
                seed,
            )
            options: dict = {}
            if compression == "jpeg":
                options = {"compression": "jpeg", "photometric": "rgb"}
            else:
                options = {"compression": compression, "photometric": "rgb"}
            writer.write(
                tiles,
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                subfiletype=0 if index == 0 or aperio else 1,
                description=description,
                resolution=(resolution[0] / downsample, resolution[1] / downsample)
                if resolution
                else None,
                resolutionunit="CENTIMETER" if resolution else None,
                metadata=None,
                **options,
            )
            if aperio and index == 0:
                thumbnail = tissue_pixels(
                    0, 0, max(1, width // 32), max(1, height // 32), 32, seed
                )
                writer.write(
                    thumbnail,
                    description="Aperio Image Library thumbnail",
                    photometric="rgb",
                    metadata=None,
                )
        if label_text is not None:
            label = _label_image(label_text)
            if aperio:
                writer.write(
                    label,
                    subfiletype=1,
                    compression="lzw",
                    photometric="rgb",
                    description="Aperio Image Library v12.0.15\nlabel 400x300",
                    metadata=None,
                )
                writer.write(
                    label,
                    subfiletype=9,
                    compression="jpeg",
                    photometric="rgb",
                    description="Aperio Image Library v12.0.15\nmacro 400x300",
                    metadata=None,
                )
            else:
                writer.write(
                    label,
                    subfiletype=1,
                    photometric="rgb",
                    description="label",
                    metadata=None,
                )
                writer.write(
                    label,
                    subfiletype=1,
                    photometric="rgb",
                    description="macro",
                    metadata=None,
                )
    return path


def _level_tiles(
    width: int,
    height: int,
    level_width: int,
    level_height: int,
    tile_size: int,
    downsample: int,
    compression: str,
    quality: int,
    sparse_every: int,
    seed: int,
) -> Iterator[bytes | np.ndarray]:
    cols = math.ceil(level_width / tile_size)
    rows = math.ceil(level_height / tile_size)
    for row in range(rows):
        for col in range(cols):
            index = row * cols + col
            if sparse_every and index % sparse_every:
                yield b""
                continue
            pixels = tissue_pixels(
                col * tile_size * downsample,
                row * tile_size * downsample,
                tile_size,
                tile_size,
                downsample,
                seed,
                width,
                height,
            )
            if compression == "jpeg":
                yield simplejpeg.encode_jpeg(
                    pixels, quality=quality, colorspace="RGB", colorsubsampling="420"
                )
            else:
                yield pixels
