"""Regions, thumbnails and tile batches, and the pixel reading IIIF shares.

Every image here is cut from the DeepZoom pyramid through TileService.tile,
so regions reuse the tiles in the LMDB store and add to it as they go. A
request is resampled from the finest DeepZoom level that is no finer than it
needs. That level is read only if it fits a pixel budget, so the configured
limits bound the memory of one request, whatever its parameters.

Endpoints (see docs/API.md):

- ``GET /slides/{id}/region``: a rectangle at a level or a target mpp;
- ``GET /slides/{id}/thumbnail``: the whole slide within a maximum size;
- ``POST /slides/{id}/tiles``: many DeepZoom tiles in one multipart response.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import math
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from aiohttp import MultipartWriter, web
from PIL import Image

from tiled import metrics
from tiled.codecs import Codec, Tile, encode_jpeg, encode_png
from tiled.config import LimitsSettings
from tiled.errors import BadRequest, NotFound
from tiled.pyramid import TileMaker
from tiled.slides import SlidePyramid

# Largest coordinate accepted in a request; far beyond any slide, but small
# enough that arithmetic on it stays exact in floats.
MAX_COORDINATE = 1 << 31
# A DeepZoom level is read only if its rectangle has at most this many times
# limits.max_area pixels. Otherwise a coarser level is read.
READ_BUDGET_FACTOR = 2
# Renders reading more than this many pixels run at most LARGE_RENDERS_AT_ONCE
# at a time per service, so a burst of large requests cannot multiply the
# memory bound.
LARGE_RENDER_PIXELS = 1 << 22
LARGE_RENDERS_AT_ONCE = 2
_large_render_gates: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)
# Outputs larger than LARGE_RENDER_PIXELS (resampled, rotated and encoded) are
# made at most LARGE_RENDERS_AT_ONCE at a time too. A separate semaphore, so a
# request holding an output slot never waits for a read slot held by another
# that waits for its output slot.
_large_output_gates: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def large_output_gate(service: Any, pixels: int) -> AsyncIterator[None]:
    """Hold one of the service's large-output slots while making a big image."""
    if pixels <= LARGE_RENDER_PIXELS:
        yield
        return
    gate = _large_output_gates.get(service)
    if gate is None:
        gate = _large_output_gates[service] = asyncio.Semaphore(LARGE_RENDERS_AT_ONCE)
    async with gate:
        yield


DEFAULT_QUALITY = 90
MEDIA_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "npy": "application/x-npy",
}
FORMAT_ALIASES = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}


@dataclasses.dataclass(frozen=True, slots=True)
class Box:
    """A rectangle in level-0 pixels; may be fractional and may leave the image."""

    x: float
    y: float
    width: float
    height: float


def service_of(request: web.Request) -> Any:
    # Imported here because tiled.server imports this module to add its routes.
    from tiled.server import SERVICE

    return request.app[SERVICE]


def limits_of(request: web.Request) -> LimitsSettings:
    from tiled.server import SETTINGS

    return request.app[SETTINGS].limits


async def pyramid_of(request: web.Request, slide_id: str) -> SlidePyramid:
    from tiled.server import CATALOG

    service = service_of(request)
    entry = request.app[CATALOG].get(slide_id)
    return entry.pyramid or await service.pyramid(entry)


def check_output_size(width: int, height: int, limits: LimitsSettings) -> None:
    """Raise BadRequest if an output size is empty or over the configured limits."""
    if width < 1 or height < 1:
        raise BadRequest(f"the output size {width}x{height} has no pixels")
    if width > limits.max_width or height > limits.max_height:
        raise BadRequest(
            f"the output size {width}x{height} exceeds the maximum "
            f"{limits.max_width}x{limits.max_height}"
        )
    if width * height > limits.max_area:
        raise BadRequest(
            f"the output size {width}x{height} has {width * height} pixels, "
            f"more than the maximum area of {limits.max_area}"
        )


async def read_level_region(
    service: Any,
    pyramid: SlidePyramid,
    z: int,
    z_x0: int,
    z_y0: int,
    z_x1: int,
    z_y1: int,
) -> np.ndarray:
    """Return a rectangle of DeepZoom level ``z``; area outside it is white.

    Tiles come from the store or are made by TileService, which dedupes
    concurrent makes of one tile and writes new tiles back.
    """
    addresses = pyramid.geometry.tiles_covering(z, z_x0, z_y0, z_x1, z_y1)
    results = await asyncio.gather(
        *(service.tile(pyramid, z, t_col, t_row) for t_col, t_row in addresses)
    )
    fetched = {
        (z, t_col, t_row): tile
        for (t_col, t_row), (tile, _) in zip(addresses, results, strict=True)
    }
    return await service.run(_assemble, pyramid, fetched, z, z_x0, z_y0, z_x1, z_y1)


def _assemble(
    pyramid: SlidePyramid,
    fetched: dict[tuple[int, int, int], Tile],
    z: int,
    z_x0: int,
    z_y0: int,
    z_x1: int,
    z_y1: int,
) -> np.ndarray:
    reader = pyramid.readers.get(pyramid.entry)

    def fetch(fz: int, t_col: int, t_row: int) -> Tile:
        return fetched[(fz, t_col, t_row)]

    maker = TileMaker(reader, pyramid.geometry, pyramid.jpeg_quality, fetch)
    return maker.read_level_region(z, z_x0, z_y0, z_x1, z_y1)


def choose_level(
    pyramid: SlidePyramid, box: Box, out_width: int, out_height: int, budget: int
) -> tuple[int, int, int, int, int]:
    """Pick the DeepZoom level to resample a box from; return it and its rectangle.

    The level is the finest one whose downsample is at most the request's
    smaller scale, made coarser while its rectangle exceeds ``budget`` pixels.
    """
    geometry = pyramid.geometry
    scale = min(box.width / out_width, box.height / out_height)
    steps = int(math.floor(math.log2(scale))) if scale >= 1 else 0
    steps = min(max(steps, 0), geometry.level_count - 1)
    while True:
        downsample = 2**steps
        z_x0 = math.floor(box.x / downsample)
        z_y0 = math.floor(box.y / downsample)
        z_x1 = math.ceil((box.x + box.width) / downsample)
        z_y1 = math.ceil((box.y + box.height) / downsample)
        area = (z_x1 - z_x0) * (z_y1 - z_y0)
        if area <= budget or steps == geometry.level_count - 1:
            break
        steps += 1
    if area > budget:
        raise BadRequest("the requested region is too large to read")
    z = geometry.level_count - 1 - steps
    return z, z_x0, z_y0, z_x1, z_y1


async def render(
    service: Any,
    pyramid: SlidePyramid,
    box: Box,
    out_width: int,
    out_height: int,
    limits: LimitsSettings,
    source_samples: bool = False,
) -> np.ndarray:
    """Return a level-0 box resampled to exactly out_width x out_height.

    The pixels are the reader's 8-bit RGB rendering, or with
    ``source_samples`` the stored samples at their own bit depth and channel
    count (for .npy output). Area outside the slide is white. Raise
    BadRequest if the output exceeds the limits.
    """
    check_output_size(out_width, out_height, limits)
    if box.width <= 0 or box.height <= 0:
        raise BadRequest("the requested region has no pixels")
    budget = READ_BUDGET_FACTOR * limits.max_area
    z, z_x0, z_y0, z_x1, z_y1 = choose_level(
        pyramid, box, out_width, out_height, budget
    )
    gate = None
    if (z_x1 - z_x0) * (z_y1 - z_y0) > LARGE_RENDER_PIXELS:
        gate = _large_render_gates.get(service)
        if gate is None:
            gate = _large_render_gates[service] = asyncio.Semaphore(
                LARGE_RENDERS_AT_ONCE
            )
        await gate.acquire()
    try:
        pixels = await read_level_region(service, pyramid, z, z_x0, z_y0, z_x1, z_y1)
        downsample = pyramid.geometry.downsample(z)
        display = None if source_samples else pyramid.to_display
        return await service.run(
            _resample,
            pixels,
            box,
            downsample,
            z_x0,
            z_y0,
            out_width,
            out_height,
            display,
        )
    finally:
        if gate is not None:
            gate.release()


def _resample(
    pixels: np.ndarray,
    box: Box,
    downsample: int,
    z_x0: int,
    z_y0: int,
    out_width: int,
    out_height: int,
    display: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    if display is not None:
        pixels = display(pixels)
    left = box.x / downsample - z_x0
    top = box.y / downsample - z_y0
    right = (box.x + box.width) / downsample - z_x0
    bottom = (box.y + box.height) / downsample - z_y0
    height, width = pixels.shape[:2]
    if (left, top, right, bottom) == (0, 0, width, height) and (width, height) == (
        out_width,
        out_height,
    ):
        return pixels
    if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        image = Image.fromarray(pixels).resize(
            (out_width, out_height),
            Image.Resampling.LANCZOS,
            box=(left, top, right, bottom),
        )
        return np.asarray(image)
    # Other sample counts and depths are resampled one channel at a time as
    # 32-bit float, then rounded back into the source type's range.
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = []
    for index in range(pixels.shape[2]):
        channel = Image.fromarray(pixels[:, :, index].astype(np.float32), mode="F")
        channel = channel.resize(
            (out_width, out_height),
            Image.Resampling.LANCZOS,
            box=(left, top, right, bottom),
        )
        channels.append(np.asarray(channel))
    stacked = np.stack(channels, axis=2)
    if np.issubdtype(pixels.dtype, np.integer):
        info = np.iinfo(pixels.dtype)
        stacked = np.clip(np.rint(stacked), info.min, info.max)
    return stacked.astype(pixels.dtype)


def encode_image(
    image: Image.Image | np.ndarray, image_format: str, quality: int
) -> bytes:
    """Encode pixels as jpeg, png, webp or npy (numpy's .npy array file).

    Grey (L), bitonal (1) and images with alpha are kept as such where the
    format can carry them; JPEG drops alpha onto white.
    """
    if image_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(image), allow_pickle=False)
        return buffer.getvalue()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image_format == "webp":
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=quality)
        return buffer.getvalue()
    if image_format == "png":
        if image.mode == "1":
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            return buffer.getvalue()
        return encode_png(np.asarray(image))
    if image.mode in ("RGBA", "LA"):
        background = Image.new(image.mode[:-1], image.size, 255)
        background.paste(image, mask=image.getchannel("A"))
        image = background
    elif image.mode not in ("RGB", "L"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    return encode_jpeg(np.asarray(image), quality)


def _int_parameter(
    request: web.Request, name: str, default: int | None, low: int, high: int
) -> int:
    text = request.query.get(name)
    if text is None:
        if default is None:
            raise BadRequest(f"missing query parameter {name!r}")
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name}={value} is not in {low}..{high}")
    return value


def _format_parameter(request: web.Request, allowed: tuple[str, ...]) -> str:
    text = request.query.get("format", "jpeg").lower()
    image_format = FORMAT_ALIASES.get(text, text)
    if image_format not in allowed:
        raise BadRequest(
            f"unsupported format {text!r}; use one of {', '.join(allowed)}"
        )
    return image_format


def _response(
    request: web.Request, body: bytes, image_format: str, etag: str
) -> web.Response:
    from tiled.server import SETTINGS

    max_age = request.app[SETTINGS].server.tile_max_age_seconds
    headers = {"ETag": etag, "Cache-Control": f"public, max-age={max_age}"}
    return web.Response(
        body=body, content_type=MEDIA_TYPES[image_format], headers=headers
    )


async def get_region(request: web.Request) -> web.StreamResponse:
    """Serve a rectangle of a slide at a power-of-two level or a target mpp.

    ``x`` and ``y`` are level-0 pixels; ``width`` and ``height`` are pixels of
    the output, as in OpenSlide's read_region.
    """
    from tiled.server import etag_for, not_modified

    limits = limits_of(request)
    slide_id = request.match_info["slide_id"]
    x = _int_parameter(request, "x", None, -MAX_COORDINATE, MAX_COORDINATE)
    y = _int_parameter(request, "y", None, -MAX_COORDINATE, MAX_COORDINATE)
    width = _int_parameter(request, "width", None, 1, limits.max_width)
    height = _int_parameter(request, "height", None, 1, limits.max_height)
    image_format = _format_parameter(request, ("jpeg", "png", "webp", "npy"))
    quality = _int_parameter(request, "quality", DEFAULT_QUALITY, 1, 100)
    check_output_size(width, height, limits)
    pyramid = await pyramid_of(request, slide_id)
    if "level" in request.query and "mpp" in request.query:
        raise BadRequest("give either level or mpp, not both")
    if "mpp" in request.query:
        scale_x, scale_y = _mpp_scale(pyramid, request.query["mpp"])
        selector = f"mpp{request.query['mpp']}"
    else:
        top = pyramid.geometry.level_count - 1
        level = _int_parameter(request, "level", 0, 0, top)
        scale_x = scale_y = float(2**level)
        selector = f"level{level}"
    etag = etag_for(
        pyramid.entry.id, pyramid.generation, pyramid.variant, "region",
        x, y, width, height, selector, image_format, quality,
    )  # fmt: skip
    if not_modified(request, etag):
        return web.Response(status=304, headers={"ETag": etag})
    box = Box(x, y, width * scale_x, height * scale_y)
    service = service_of(request)
    async with large_output_gate(service, width * height):
        pixels = await render(
            service, pyramid, box, width, height, limits, image_format == "npy"
        )
        body = await service.run(encode_image, pixels, image_format, quality)
    response = _response(request, body, image_format, etag)
    response.headers["X-Tiled-Downsample"] = f"{scale_x:g},{scale_y:g}"
    return response


def _mpp_scale(pyramid: SlidePyramid, text: str) -> tuple[float, float]:
    """Return the level-0 pixels per output pixel, across and down, for an mpp."""
    try:
        target = float(text)
    except ValueError:
        raise BadRequest("query parameter 'mpp' must be a number") from None
    if not math.isfinite(target) or target <= 0:
        raise BadRequest("query parameter 'mpp' must be a positive number")
    mpp = pyramid.record.get("mpp")
    if not mpp:
        raise BadRequest(
            "the slide states no microns per pixel; ask for a level instead of mpp"
        )
    scale_x, scale_y = target / mpp[0], target / mpp[1]
    # An output finer than 1/64 of a level-0 pixel shows nothing new.
    if min(scale_x, scale_y) < 1 / 64:
        raise BadRequest(
            f"mpp={target:g} is more than 64 times finer than the slide's {mpp[0]:g}"
        )
    return scale_x, scale_y


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    """Serve the whole slide fitted within max_size x max_size, never enlarged."""
    from tiled.server import etag_for, not_modified

    limits = limits_of(request)
    slide_id = request.match_info["slide_id"]
    largest = min(limits.max_width, limits.max_height)
    max_size = _int_parameter(request, "max_size", 512, 1, largest)
    image_format = _format_parameter(request, ("jpeg", "png", "webp", "npy"))
    quality = _int_parameter(request, "quality", DEFAULT_QUALITY, 1, 100)
    pyramid = await pyramid_of(request, slide_id)
    width, height = pyramid.geometry.level_dimensions[-1]
    out_width, out_height = fit_within(width, height, max_size, max_size)
    etag = etag_for(
        pyramid.entry.id, pyramid.generation, pyramid.variant, "thumbnail",
        out_width, out_height, image_format, quality,
    )  # fmt: skip
    if not_modified(request, etag):
        return web.Response(status=304, headers={"ETag": etag})
    service = service_of(request)
    box = Box(0, 0, width, height)
    async with large_output_gate(service, out_width * out_height):
        pixels = await render(
            service, pyramid, box, out_width, out_height, limits, image_format == "npy"
        )
        body = await service.run(encode_image, pixels, image_format, quality)
    return _response(request, body, image_format, etag)


def fit_within(
    width: int, height: int, max_width: int, max_height: int
) -> tuple[int, int]:
    """Return width x height scaled down to fit a box, keeping the aspect ratio."""
    scale = min(1.0, max_width / width, max_height / height)
    if scale == 1.0:
        return width, height
    if max_width / width <= max_height / height:
        return max_width, max(1, min(max_height, round(height * max_width / width)))
    return max(1, min(max_width, round(width * max_height / height))), max_height


def _parse_batch(body: Any, limit: int) -> tuple[list[tuple[int, int, int]], str]:
    if not isinstance(body, dict) or not isinstance(body.get("tiles"), list):
        raise BadRequest('the body must be a JSON object {"tiles": [...]}')
    tiles = body["tiles"]
    if not tiles:
        raise BadRequest("the tile list is empty")
    if len(tiles) > limit:
        raise BadRequest(f"{len(tiles)} tiles requested; at most {limit} per request")
    addresses = []
    for index, item in enumerate(tiles):
        if isinstance(item, dict):
            item = [item.get("level"), item.get("col"), item.get("row")]
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(type(value) is int for value in item)
        ):
            raise BadRequest(
                f"tiles[{index}] must be {{level, col, row}} or [level, col, row] "
                "with integer values"
            )
        addresses.append((item[0], item[1], item[2]))
    text = body.get("format", "jpeg")
    image_format = FORMAT_ALIASES.get(text) if isinstance(text, str) else None
    if image_format not in ("jpeg", "png"):
        raise BadRequest(f"unsupported tile format {text!r}; use jpeg or png")
    return addresses, image_format


async def post_tiles(request: web.Request) -> web.Response:
    """Serve many DeepZoom tiles of one slide as one multipart/mixed response.

    Parts come in request order; each has the tile's DeepZoom URL in
    Content-Location and its address in X-Tile-Address.
    """
    limits = limits_of(request)
    slide_id = request.match_info["slide_id"]
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    addresses, image_format = _parse_batch(body, limits.batch_max_tiles)
    pyramid = await pyramid_of(request, slide_id)
    geometry = pyramid.geometry
    for index, (z, t_col, t_row) in enumerate(addresses):
        if not geometry.valid(z, t_col, t_row):
            raise NotFound(
                f"tiles[{index}]: no tile {t_col},{t_row} at DeepZoom level {z}"
            )
    service = service_of(request)
    bodies = await asyncio.gather(
        *(
            deepzoom_tile_bytes(service, pyramid, address, image_format, "region")
            for address in addresses
        )
    )
    writer = MultipartWriter("mixed")
    for (z, t_col, t_row), data in zip(addresses, bodies, strict=True):
        location = f"/slides/{slide_id}_files/{z}/{t_col}_{t_row}.{image_format}"
        writer.append(
            data,
            {
                "Content-Type": MEDIA_TYPES[image_format],
                "Content-Location": location,
                "X-Tile-Address": f"{z}/{t_col}/{t_row}",
            },
        )
    return web.Response(body=writer, headers={"Cache-Control": "no-store"})


async def deepzoom_tile_bytes(
    service: Any,
    pyramid: SlidePyramid,
    address: tuple[int, int, int],
    image_format: str,
    route: str,
) -> bytes:
    """Return one DeepZoom tile as jpeg or png, passing stored bytes through.

    Converted tiles share the encoded cache of the DeepZoom route.
    """
    z, t_col, t_row = address
    tile, outcome = await service.tile(pyramid, z, t_col, t_row)
    native = {"jpeg": Codec.JPEG, "png": Codec.PNG}[image_format]
    if tile.codec == native:
        data = tile.data
    else:
        cache_key = pyramid.key(z, t_col, t_row) + b"." + image_format.encode()
        data = service.encoded.get(cache_key)
        if data is None:
            data = await service.run(
                service.encode, tile, image_format, pyramid.jpeg_quality
            )
            service.encoded.put(cache_key, data)
    metrics.TILES_SERVED.labels(
        route,
        outcome,
        tile.codec.label,
        metrics.level_bucket(pyramid.geometry.levels_below_full(z)),
    ).inc()
    return data


def add_routes(app: web.Application) -> None:
    app.router.add_get("/slides/{slide_id}/region", get_region)
    app.router.add_get("/slides/{slide_id}/thumbnail", get_thumbnail)
    app.router.add_post("/slides/{slide_id}/tiles", post_tiles)
