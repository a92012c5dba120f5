"""The HTTP daemon: aiohttp on uvloop.

Hot tiles are read from LMDB on the event loop: a page-cache hit takes a
few microseconds, less than a hop to a thread. Opening slides, decoding,
resampling, encoding and store writes run in a thread pool.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from tiled import __version__, dicomweb, iiif, metrics, regions
from tiled.codecs import Codec, Tile, decode_tile, encode_jpeg, encode_png, to_rgb8
from tiled.config import Settings
from tiled.errors import BadRequest, Forbidden, NotFound, TiledError
from tiled.readers import SourceIdentity
from tiled.slides import Catalog, SlideEntry, SlidePyramid, default_store_path
from tiled.store import Store, StoreWriter

log = logging.getLogger("tiled.server")

CATALOG = web.AppKey("catalog", Catalog)
SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", "TileService")

JSON_ERROR_HEADERS = {"Cache-Control": "no-store"}
MEDIA_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}
# Most slides one GET /slides page lists.
LIST_LIMIT = 10000
TILE_PATH = re.compile(r"^(\d{1,2})/(\d{1,7})_(\d{1,7})\.(jpeg|jpg|png)$")


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response(
        {"error": code, "message": message, "status": status},
        status=status,
        headers=JSON_ERROR_HEADERS,
    )


class EncodedCache:
    """Tiles encoded for a response, bounded in bytes, least recently used out."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._items: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._items[key] = value
            self.size += len(value)
            while self.size > self.capacity:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)


class TileService:
    """Tiles of every slide: the store first, then made in the thread pool."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.server.threads, thread_name_prefix="tiled-worker"
        )
        self.encoded = EncodedCache(settings.store.memory_cache_bytes)
        self._in_flight: dict[bytes, asyncio.Future[Tile]] = {}

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, function, *args)

    async def pyramid(self, entry: SlideEntry) -> SlidePyramid:
        pyramid = entry.pyramid
        if pyramid is None:
            pyramid = await self.run(self.catalog.open, entry)
        return pyramid

    async def tile(
        self, pyramid: SlidePyramid, z: int, t_col: int, t_row: int
    ) -> tuple[Tile, str]:
        """Return a tile and its cache outcome: hit, or generated."""
        tile = pyramid.cached(z, t_col, t_row)
        if tile is not None:
            return tile, "hit"
        key = pyramid.key(z, t_col, t_row)
        future = self._in_flight.get(key)
        if future is not None:
            return await asyncio.shield(future), "hit"
        future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            tile = await self.run(pyramid.make, z, t_col, t_row)
        except BaseException as error:
            future.set_exception(error)
            # The waiters, if any, consume the exception; none means no warning.
            future.exception()
            raise
        else:
            future.set_result(tile)
        finally:
            del self._in_flight[key]
        return tile, "generated"

    def encode(
        self,
        tile: Tile,
        extension: str,
        quality: int,
        display: Callable[[Any], Any] = to_rgb8,
    ) -> bytes:
        """Return tile bytes in the requested format, converting if needed.

        ``display`` renders stored pixels (any sample count, 8 or 16 bits) as
        8-bit RGB; it is the slide reader's ``to_display``.
        """
        if extension == "png" and tile.codec == Codec.PNG:
            return tile.data
        if extension == "jpeg" and tile.codec == Codec.JPEG:
            return tile.data
        pixels = decode_tile(tile)
        # Only raw (zstd) tiles hold source samples; other codecs hold
        # pixels that were rendered for display when the tile was made.
        pixels = display(pixels) if tile.codec == Codec.ZSTD else to_rgb8(pixels)
        if extension == "png":
            return encode_png(pixels)
        return encode_jpeg(pixels, quality)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def route_of(path: str) -> str:
    if path.startswith("/slides/"):
        if "_files/" in path or path.endswith(".dzi"):
            return "deepzoom"
        if path.endswith(("/region", "/thumbnail", "/tiles")):
            return "region"
        return "api"
    if path.startswith("/iiif/"):
        return "iiif"
    if path.startswith("/dicomweb/"):
        return "dicomweb"
    if path.startswith("/region") or path.startswith("/api/"):
        return "region"
    if path in ("/healthz", "/metrics"):
        return "ops"
    if path == "/slides":
        return "api"
    return "viewer"


@web.middleware
async def observe(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Count, time and turn errors into JSON; add CORS headers."""
    started = time.perf_counter()
    route = route_of(request.path)
    metrics.HTTP_IN_FLIGHT.inc()
    try:
        if request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = (
                "GET, HEAD, POST, OPTIONS"
            )
            # Content-Type: the tile batch endpoint takes a JSON body.
            response.headers["Access-Control-Allow-Headers"] = (
                "Accept, Content-Type, If-None-Match, Range"
            )
            response.headers["Access-Control-Max-Age"] = "86400"
        else:
            try:
                response = await handler(request)
            except TiledError as error:
                response = error_response(error.status, error.code, str(error))
            except web.HTTPException as error:
                if error.status < 400:
                    raise
                response = error_response(
                    error.status, error.reason.lower().replace(" ", "_"), error.reason
                )
                if error.status == 405:
                    response.headers["Allow"] = error.headers.get("Allow", "GET, HEAD")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unhandled error on %s %s", request.method, route)
                response = error_response(
                    500, "internal_error", "internal server error"
                )
        origins = request.app[SETTINGS].server.cors_origins
        if origins:
            origin = request.headers.get("Origin")
            if "*" in origins:
                response.headers["Access-Control-Allow-Origin"] = "*"
            elif origin in origins:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = "ETag, Content-Length"
        return response
    finally:
        metrics.HTTP_IN_FLIGHT.dec()
        status = locals().get("response")
        code = status.status if status is not None else 500
        metrics.HTTP_REQUESTS.labels(route, request.method, f"{code // 100}xx").inc()
        metrics.HTTP_REQUEST_DURATION.labels(route).observe(
            time.perf_counter() - started
        )
        if status is not None and status.body_length:
            metrics.HTTP_RESPONSE_BYTES.labels(route).inc(status.body_length)


def etag_for(*parts: object) -> str:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=12)
    return f'"{digest.hexdigest()}"'


def tile_etag(
    pyramid: SlidePyramid,
    z: int,
    t_col: int,
    t_row: int,
    extension: str,
    representation: str = "",
) -> str:
    """Return the strong ETag of a DeepZoom tile; tiled/fastpath.py uses it too.

    The pyramid's prefix hashes the slide, generation and DeepZoom variant
    once, so a tile's ETag costs one string format per request.
    """
    return (
        f'"{pyramid.etag_prefix}-{z:x}-{t_col:x}-{t_row:x}-{extension}{representation}"'
    )


def not_modified(request: web.Request, etag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    # If-None-Match uses weak comparison (RFC 9110, section 13.1.2).
    candidates = (value.strip().removeprefix("W/") for value in header.split(","))
    return etag in candidates


def _slide_summary(
    entry: SlideEntry,
    record: dict[str, Any] | None,
    settings: Settings,
    error: TiledError | None = None,
) -> dict[str, Any]:
    name = entry.name if settings.slides.show_file_names else entry.id
    summary: dict[str, Any] = {"id": entry.id, "name": name}
    if record is None:
        summary["available"] = False
        if error is not None:
            summary["error"] = {"error": error.code, "message": str(error)}
        return summary
    level0 = record["levels"][0]
    summary.update(
        available=True,
        format=record["format"],
        width=level0["width"],
        height=level0["height"],
        dzi=f"/slides/{entry.id}.dzi",
    )
    return summary


def _stored_record(catalog: Catalog, entry: SlideEntry) -> dict[str, Any] | None:
    """Return the store's record of a slide if it still describes the file.

    Only stat fields are compared, so listing reads no file. Opening the slide
    for tiles also checks the content fingerprint.
    """
    record = catalog.store.get_slide(entry.id)
    if record is None:
        return None
    try:
        identity = SourceIdentity.of(entry.path)
    except OSError:
        return None
    source = record["source"]
    unchanged = (
        source.get("path") == identity.path
        and source.get("size") == identity.size
        and source.get("mtime_ns") == identity.mtime_ns
    )
    return record if unchanged else None


def _list_page(
    catalog: Catalog, settings: Settings, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """Summarise one page of slides; blocking, so it runs in the thread pool.

    A slide the store already describes is listed from its record, so a large
    archive is listed without opening every file.
    """
    entries = list(catalog.entries())
    page = []
    for entry in entries[offset : offset + limit]:
        if entry.pyramid is not None:
            page.append(_slide_summary(entry, entry.pyramid.record, settings))
            continue
        record = _stored_record(catalog, entry) if entry.error is None else None
        if record is not None:
            page.append(_slide_summary(entry, record, settings))
            continue
        try:
            pyramid = catalog.open(entry)
        except TiledError as error:
            page.append(_slide_summary(entry, None, settings, error))
            continue
        page.append(_slide_summary(entry, pyramid.record, settings))
    return page, len(entries)


def _query_int(request: web.Request, name: str, default: int, maximum: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) > maximum:
        raise BadRequest(f"{name} must be an integer from 0 to {maximum}")
    return int(text)


async def list_slides(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    service = request.app[SERVICE]
    settings = request.app[SETTINGS]
    offset = _query_int(request, "offset", 0, 10**9)
    limit = _query_int(request, "limit", LIST_LIMIT, LIST_LIMIT)
    if time.monotonic() - catalog._last_scan > 30:
        await service.run(catalog.scan)
    slides, total = await service.run(_list_page, catalog, settings, offset, limit)
    return json_response(
        {"slides": slides, "total": total, "offset": offset, "limit": limit}
    )


def associated_image_served(
    settings: Settings, entry: SlideEntry, reader: Any, name: str
) -> bool:
    """Return True if an associated image of a slide may be sent to clients.

    Thumbnails always are. Label and macro images (and any other kind) can
    show a patient's name or barcode, so they are sent only when
    slides.associated_images is on or the slide lies under one of
    slides.associated_image_folders.
    """
    if name in reader.SERVED_ASSOCIATED:
        return True
    if settings.slides.associated_images:
        return True
    slide_path = os.path.realpath(entry.path)
    for folder in settings.slides.associated_image_folders:
        folder = os.path.realpath(folder)
        if os.path.commonpath([slide_path, folder]) == folder:
            return True
    return False


async def get_associated(request: web.Request) -> web.Response:
    """Send a slide's label, macro or thumbnail image as JPEG or PNG."""
    catalog = request.app[CATALOG]
    service = request.app[SERVICE]
    settings = request.app[SETTINGS]
    slide_id = request.match_info["slide_id"]
    name = request.match_info["image"]
    extension = request.match_info["extension"]
    extension = "jpeg" if extension == "jpg" else extension
    entry = catalog.get(slide_id)
    pyramid = await service.pyramid(entry)
    reader = await service.run(catalog.readers.get, entry)
    if name not in reader.associated_images:
        raise NotFound(f"slide {slide_id} has no {name} image")
    if not associated_image_served(settings, entry, reader, name):
        raise Forbidden(
            f"the {name} image of slide {slide_id} is withheld because it can "
            "show patient data; enable slides.associated_images or list its "
            "folder in slides.associated_image_folders"
        )
    etag = etag_for(entry.id, pyramid.generation, "associated", name, extension)
    headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
    if not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    cache_key = f"{entry.id}/{pyramid.generation}/{name}.{extension}".encode()
    body = service.encoded.get(cache_key)
    if body is None:

        def render() -> bytes:
            pixels = to_rgb8(reader.read_associated(name))
            if extension == "png":
                return encode_png(pixels)
            return encode_jpeg(pixels, pyramid.jpeg_quality)

        body = await service.run(render)
        service.encoded.put(cache_key, body)
    return web.Response(body=body, content_type=MEDIA_TYPES[extension], headers=headers)


async def get_slide(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    service = request.app[SERVICE]
    settings = request.app[SETTINGS]
    slide_id = request.match_info["slide_id"]
    if slide_id.endswith(".dzi"):
        return await get_dzi(request, slide_id[:-4])
    entry = catalog.get(slide_id)
    pyramid = await service.pyramid(entry)
    reader = await service.run(catalog.readers.get, entry)
    data = _slide_summary(entry, pyramid.record, settings)
    geometry = pyramid.geometry
    data.update(
        mpp=pyramid.record["mpp"],
        levels=pyramid.record["levels"],
        associated_images=sorted(reader.associated_images),
        associated={
            name: {
                "width": size[0],
                "height": size[1],
                "served": associated_image_served(settings, entry, reader, name),
            }
            for name, size in sorted(reader.associated_images.items())
        },
        properties=dict(reader.properties),
        deepzoom={
            "tile_size": geometry.tile_size,
            "overlap": geometry.overlap,
            "format": "jpeg",
            "level_count": geometry.level_count,
            "level_dimensions": geometry.level_dimensions,
            "level_tiles": geometry.level_tiles,
            "stored_complete": pyramid.complete,
        },
    )
    return json_response(data)


async def get_dzi(request: web.Request, slide_id: str) -> web.Response:
    catalog = request.app[CATALOG]
    service = request.app[SERVICE]
    entry = catalog.get(slide_id)
    pyramid = await service.pyramid(entry)
    width, height = pyramid.geometry.level_dimensions[-1]
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
        f'Format="jpeg" Overlap="{pyramid.overlap}" TileSize="{pyramid.tile_size}">'
        f'<Size Width="{width}" Height="{height}"/></Image>\n'
    )
    etag = etag_for(entry.id, pyramid.generation, pyramid.variant, "dzi")
    headers = {"ETag": etag, "Cache-Control": "public, max-age=300"}
    if not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    return web.Response(text=text, content_type="application/xml", headers=headers)


async def get_tile(request: web.Request) -> web.Response:
    app = request.app
    slide_id = request.match_info["slide_id"]
    match = TILE_PATH.match(request.match_info["tail"])
    if match is None:
        raise BadRequest(
            "a DeepZoom tile path is {id}_files/{level}/{col}_{row}.jpeg or .png"
        )
    z, t_col, t_row = int(match[1]), int(match[2]), int(match[3])
    extension = "jpeg" if match[4] == "jpg" else match[4]
    service = app[SERVICE]
    entry = app[CATALOG].get(slide_id)
    pyramid = entry.pyramid or await service.pyramid(entry)
    geometry = pyramid.geometry
    if not geometry.valid(z, t_col, t_row):
        raise NotFound(
            f"no tile {t_col},{t_row} at DeepZoom level {z} of slide {slide_id}"
        )
    settings = app[SETTINGS]
    # ?format=png16 sends the stored samples of a lossless slide (8 or 16
    # bits, no display rendering) in place of the 8-bit RGB display PNG.
    source_samples = request.query.get("format") == "png16"
    if source_samples and extension != "png":
        raise BadRequest("format=png16 applies to .png tiles only")
    etag = tile_etag(
        pyramid, z, t_col, t_row, extension, "png16" if source_samples else ""
    )
    headers = {
        "ETag": etag,
        "Cache-Control": f"public, max-age={settings.server.tile_max_age_seconds}",
    }
    if not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    tile, outcome = await service.tile(pyramid, z, t_col, t_row)
    native = (tile.codec == Codec.JPEG and extension == "jpeg") or (
        tile.codec == Codec.PNG and extension == "png"
    )
    if source_samples:
        body = await service.run(source_png, tile)
    elif native:
        body = tile.data
    else:
        cache_key = pyramid.key(z, t_col, t_row) + b"." + extension.encode()
        body = service.encoded.get(cache_key)
        if body is None:
            body = await service.run(
                service.encode,
                tile,
                extension,
                pyramid.jpeg_quality,
                pyramid.to_display,
            )
            service.encoded.put(cache_key, body)
    metrics.TILES_SERVED.labels(
        "deepzoom",
        outcome,
        tile.codec.label,
        metrics.level_bucket(geometry.levels_below_full(z)),
    ).inc()
    return web.Response(body=body, content_type=MEDIA_TYPES[extension], headers=headers)


def source_png(tile: Tile) -> bytes:
    """Encode a lossless tile's stored samples as PNG, keeping 16-bit depth."""
    if tile.codec != Codec.ZSTD:
        raise BadRequest(
            "format=png16 needs a lossless slide; this slide's tiles are "
            f"{tile.codec.label}, so request the plain .png tile"
        )
    if tile.samples not in (1, 3, 4):
        raise BadRequest(
            f"format=png16 cannot hold {tile.samples} channels in one PNG; "
            "PNG holds 1, 3 or 4 samples per pixel"
        )
    return encode_png(decode_tile(tile))


async def healthz(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    return json_response(
        {"status": "ok", "version": __version__, "slides": len(catalog._entries)},
        headers=JSON_ERROR_HEADERS,
    )


async def metrics_handler(request: web.Request) -> web.Response:
    request.app[CATALOG].store.update_gauges()
    body, content_type = metrics.render_metrics()
    response = web.Response(body=body, headers=JSON_ERROR_HEADERS)
    response.headers["Content-Type"] = content_type
    return response


def _static_path() -> str:
    return str(resources.files("tiled") / "static")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        os.path.join(_static_path(), "index.html"),
        headers={"Cache-Control": "no-cache"},
    )


async def _lag_monitor() -> None:
    interval = 0.25
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - due))


async def _housekeeping(app: web.Application) -> None:
    service = app[SERVICE]
    catalog = app[CATALOG]
    while True:
        await asyncio.sleep(10)
        try:
            await service.run(catalog.refresh_changed)
            catalog.store.update_gauges()
        except Exception:
            log.exception("housekeeping failed")


def create_app(settings: Settings) -> web.Application:
    """Build the application; the store opens and the roots are scanned here."""
    store_path = settings.store.path or default_store_path()
    store = Store(
        store_path, settings.store.map_size_bytes, settings.store.max_map_size_bytes
    )
    writer = StoreWriter(store)
    catalog = Catalog(settings, store, writer)
    catalog.scan()
    app = web.Application(middlewares=[observe], client_max_size=1 << 16)
    app[SETTINGS] = settings
    app[CATALOG] = catalog
    app[SERVICE] = TileService(settings, catalog)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/slides", list_slides)
    app.router.add_get("/slides/{slide_id}_files/{tail:.+}", get_tile)
    app.router.add_get(
        "/slides/{slide_id}/associated/{image:[a-z]+}.{extension:jpeg|jpg|png}",
        get_associated,
    )
    app.router.add_get("/slides/{slide_id}", get_slide)
    app.router.add_static("/static/", _static_path(), append_version=False)
    regions.add_routes(app)
    iiif.add_routes(app)
    dicomweb.add_routes(app)

    async def background(app: web.Application):
        tasks = [
            asyncio.create_task(_lag_monitor()),
            asyncio.create_task(_housekeeping(app)),
        ]
        yield
        for task in tasks:
            task.cancel()
        app[SERVICE].close()
        writer.close()
        catalog.close()
        store.close()

    app.cleanup_ctx.append(background)
    log.info(
        "serving %d slides from %d roots; store at %s",
        len(catalog._entries),
        len(catalog.roots),
        store_path,
    )
    return app
