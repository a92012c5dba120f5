"""DeepZoom geometry and the making of missing levels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tiled.pyramid import DeepZoomGeometry, downsample_2x
from tiled.readers.base import Level


def geometry_for(
    width: int,
    height: int,
    tile: int = 256,
    overlap: int = 0,
    levels: list[Level] | None = None,
) -> DeepZoomGeometry:
    levels = levels or [Level(width, height, tile, tile, 1.0)]
    return DeepZoomGeometry(levels, tile, overlap)


@pytest.mark.parametrize(
    ("width", "height"), [(4875, 4071), (30000, 26319), (1, 1), (257, 3), (4096, 4096)]
)
def test_level_sizes_follow_ceil_rule(width, height):
    geometry = geometry_for(width, height)
    assert geometry.level_count == math.ceil(math.log2(max(width, height))) + 1
    assert geometry.level_dimensions[0] == (1, 1)
    assert geometry.level_dimensions[-1] == (width, height)
    for z, (w, h) in enumerate(geometry.level_dimensions):
        factor = 2 ** (geometry.level_count - 1 - z)
        assert w == math.ceil(width / factor)
        assert h == math.ceil(height / factor)


def test_odd_slide_exact_geometry():
    geometry = geometry_for(4875, 4071)
    assert geometry.level_count == 14
    assert geometry.level_dimensions[-2:] == [(2438, 2036), (4875, 4071)]
    assert geometry.level_tiles[-1] == (20, 16)
    assert geometry.level_tiles[-2] == (10, 8)
    edge = geometry.tile_box(13, 19, 15)
    assert (edge.width, edge.height) == (4875 - 19 * 256, 4071 - 15 * 256)
    assert (edge.width, edge.height) == (11, 231)


def test_sparse_slide_exact_geometry():
    geometry = geometry_for(30000, 26319)
    assert geometry.level_count == 16
    assert geometry.level_tiles[-1] == (118, 103)
    box = geometry.tile_box(15, 117, 102)
    assert (box.width, box.height) == (30000 - 117 * 256, 26319 - 102 * 256)
    assert geometry.level_tiles[-6:] == [
        (4, 4),
        (8, 7),
        (15, 13),
        (30, 26),
        (59, 52),
        (118, 103),
    ]
    # 12154 + 3068 + 780 + 195 + 56 + 16 + 4, plus nine 1x1 levels.
    assert sum(c * r for c, r in geometry.level_tiles) == 16282


def test_overlap_tile_boxes():
    geometry = geometry_for(1000, 700, tile=254, overlap=1)
    first = geometry.tile_box(geometry.level_count - 1, 0, 0)
    assert (first.z_x0, first.z_y0, first.z_x1, first.z_y1) == (0, 0, 255, 255)
    inner = geometry.tile_box(geometry.level_count - 1, 1, 1)
    assert (inner.z_x0, inner.z_y0, inner.z_x1, inner.z_y1) == (253, 253, 509, 509)
    last = geometry.tile_box(geometry.level_count - 1, 3, 2)
    assert (last.z_x1, last.z_y1) == (1000, 700)


def test_geometry_matches_openslide_deepzoom():
    openslide = pytest.importorskip("openslide")
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import Image

    for width, height, tile, overlap in [(4875, 4071, 256, 0), (777, 1333, 254, 1)]:
        image = openslide.ImageSlide(Image.new("RGB", (width, height)))
        oracle = DeepZoomGenerator(image, tile_size=tile, overlap=overlap)
        geometry = geometry_for(width, height, tile, overlap)
        assert geometry.level_count == oracle.level_count
        assert geometry.level_dimensions == list(oracle.level_dimensions)
        assert geometry.level_tiles == list(oracle.level_tiles)
        z = oracle.level_count - 1
        cols, rows = oracle.level_tiles[z]
        for col, row in [(0, 0), (cols - 1, rows - 1), (cols // 2, 0)]:
            box = geometry.tile_box(z, col, row)
            assert (box.width, box.height) == oracle.get_tile_dimensions(z, (col, row))


def test_source_levels_matched_within_one_pixel():
    levels = [
        Level(4875, 4071, 256, 256, 1.0),
        Level(1218, 1017, 256, 256, 4.0),
        Level(305, 255, 256, 256, 16.0),
    ]
    geometry = geometry_for(4875, 4071, levels=levels)
    top = geometry.level_count - 1
    assert geometry.source_level[top] == 0
    assert geometry.source_level[top - 1] is None
    assert geometry.source_level[top - 2] == 1
    assert geometry.source_level[top - 4] == 2


def test_downsample_is_area_average():
    pixels = np.array([[[0], [100], [50]], [[200], [100], [50]]], dtype=np.uint8)
    out = downsample_2x(pixels, 2, 1)
    assert out.shape == (1, 2, 1)
    assert out[0, 0, 0] == 100
    # The odd last column averages with itself, not with the background.
    assert out[0, 1, 0] == 50


def test_downsample_keeps_16_bit():
    pixels = np.full((4, 4, 1), 60000, dtype=np.uint16)
    out = downsample_2x(pixels, 2, 2)
    assert out.dtype == np.uint16
    assert (out == 60000).all()
