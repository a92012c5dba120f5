"""A fast path for hot DeepZoom tiles in front of aiohttp.

aiohttp's web layer costs about 60 µs of CPU per request on a 2-core cloud
VM (measured by bench/run.py's minimal aiohttp server), which caps a worker
near the throughput of an image server that decodes nothing. Hot tiles are
most of a viewer's traffic, so each connection starts on this protocol:

- A bodiless GET or HEAD of ``/slides/{id}_files/{z}/{col}_{row}.jpeg`` whose
  slide is open and whose tile is already a JPEG in the store is served
  here, with the same status, headers and body as the aiohttp route.
- Anything else (another path, a query string, a body, an Upgrade header, a
  tile still to be made, a parse error) hands the connection, with every
  unanswered byte, to aiohttp's request handler for good.

httptools (the llhttp parser) checks each request head. Requests are split
at the blank line that ends the head, which ends the request only when it has
no body, so a request that announces a body is handed over before splitting.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import re
import time
from collections.abc import Callable
from typing import Any

import httptools

from tiled import metrics
from tiled.codecs import Codec
from tiled.server import CATALOG, SETTINGS, tile_etag

# Request lines and heads longer than these get a JSON 414 or 431. aiohttp's
# own parser stops at 8190 bytes per line, with a plain-text error.
MAX_LINE_BYTES = 8190
MAX_HEAD_BYTES = 16384


class _MalformedRequest(Exception):
    """Raised by _answer when httptools cannot parse a request head."""


TILE_TARGET = re.compile(
    rb"^/slides/([A-Za-z0-9._-]{1,128})_files/(\d{1,2})/(\d{1,7})_(\d{1,7})\.(jpe?g)$"
)


class _HttpDate:
    """The Date header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


class FastPath:
    """Shared state of the fast-path connections of one worker."""

    def __init__(
        self, app: Any, handler_factory: Callable[[], asyncio.Protocol]
    ) -> None:
        self.catalog = app[CATALOG]
        settings = app[SETTINGS]
        self.handler_factory = handler_factory
        self.connections: set[FastPathProtocol] = set()
        self.date = _HttpDate()
        origins = settings.server.cors_origins
        self.cors_any = "*" in origins
        self.cors_origins = {origin.encode() for origin in origins}
        self.cache_control = (
            f"public, max-age={settings.server.tile_max_age_seconds}".encode()
        )
        # Labelled children are bound here, in the worker, because the
        # multiprocess setup replaces the ones made before it.
        self.requests = {
            (method, status): metrics.HTTP_REQUESTS.labels("deepzoom", method, status)
            for method in ("GET", "HEAD")
            for status in ("2xx", "3xx")
        }
        # Requests rejected before routing count under the catch-all route,
        # as unknown paths do in the aiohttp middleware.
        self.rejected = metrics.HTTP_REQUESTS.labels("viewer", "GET", "4xx")
        self.duration = metrics.HTTP_REQUEST_DURATION.labels("deepzoom")
        self.response_bytes = metrics.HTTP_RESPONSE_BYTES.labels("deepzoom")
        self.store_hits = metrics.STORE_READS.labels("hit")
        self.tiles_served = {
            bucket: metrics.TILES_SERVED.labels("deepzoom", "hit", "jpeg", bucket)
            for bucket in ("0", "1-2", "3-5", "6+")
        }

    def protocol(self) -> FastPathProtocol:
        return FastPathProtocol(self)

    def respond(
        self,
        match: re.Match[bytes],
        method: str,
        if_none_match: bytes,
        origin: bytes,
        keep_alive: bool,
        http_10: bool,
    ) -> bytes | None:
        """Return the whole response to a tile request, or None to hand it over."""
        started = time.perf_counter()
        entry = self.catalog._entries.get(match[1].decode())
        if entry is None:
            return None
        pyramid = entry.pyramid
        if pyramid is None:
            return None
        z, t_col, t_row = int(match[2]), int(match[3]), int(match[4])
        geometry = pyramid.geometry
        if not geometry.valid(z, t_col, t_row):
            return None
        etag = tile_etag(pyramid, z, t_col, t_row, "jpeg").encode()
        if if_none_match and _matches(if_none_match, etag):
            head = self._head(
                b"304 Not Modified", etag, None, origin, keep_alive, http_10
            )
            self.requests[(method, "3xx")].inc()
            self.duration.observe(time.perf_counter() - started)
            return head
        tile = pyramid.peek(z, t_col, t_row)
        if tile is None or tile.codec != Codec.JPEG:
            return None
        self.store_hits.inc()
        head = self._head(b"200 OK", etag, len(tile.data), origin, keep_alive, http_10)
        body = tile.data if method == "GET" else b""
        self.requests[(method, "2xx")].inc()
        self.tiles_served[metrics.level_bucket(geometry.levels_below_full(z))].inc()
        if body:
            self.response_bytes.inc(len(body))
        self.duration.observe(time.perf_counter() - started)
        return head + body

    def _head(
        self,
        status: bytes,
        etag: bytes,
        length: int | None,
        origin: bytes,
        keep_alive: bool,
        http_10: bool,
    ) -> bytes:
        lines = [
            b"HTTP/1.1 " + status,
            b"Date: " + self.date.now(),
            b"ETag: " + etag,
            b"Cache-Control: " + self.cache_control,
        ]
        if length is not None:
            lines.append(b"Content-Type: image/jpeg")
            lines.append(b"Content-Length: %d" % length)
        if self.cors_any:
            lines.append(b"Access-Control-Allow-Origin: *")
        elif origin in self.cors_origins:
            lines.append(b"Access-Control-Allow-Origin: " + origin)
            lines.append(b"Vary: Origin")
        if self.cors_any or self.cors_origins:
            lines.append(b"Access-Control-Expose-Headers: ETag, Content-Length")
        if not keep_alive:
            lines.append(b"Connection: close")
        elif http_10:
            lines.append(b"Connection: keep-alive")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()


def _matches(if_none_match: bytes, etag: bytes) -> bool:
    """Apply If-None-Match's weak comparison (RFC 9110, section 13.1.2)."""
    if if_none_match.strip() == b"*":
        return True
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate.startswith(b"W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


class FastPathProtocol(asyncio.Protocol):
    """One connection, served here until a request needs aiohttp."""

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._if_none_match = b""
        self._origin = b""
        self._complete = False
        self._keep_alive = True

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"if-none-match":
            self._if_none_match = value
        elif lowered == b"origin":
            self._origin = value

    def on_headers_complete(self) -> None:
        # should_keep_alive() is only meaningful before the message completes.
        self._keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self._complete = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.fast.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fast.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        self.buffer = b""
        while buffer:
            end = buffer.find(b"\r\n\r\n")
            line_end = buffer.find(b"\r\n", 0, MAX_LINE_BYTES + 2)
            if line_end < 0 and len(buffer) > MAX_LINE_BYTES:
                self._reject(414, "uri_too_long", "the request line is too long")
                return
            if end < 0 or end > MAX_HEAD_BYTES:
                if len(buffer) > MAX_HEAD_BYTES:
                    self._reject(
                        431, "headers_too_large", "the request headers are too large"
                    )
                else:
                    self.buffer = buffer
                return
            try:
                response, keep_alive = self._answer(buffer[: end + 4])
            except _MalformedRequest:
                self._reject(400, "bad_request", "the request is not valid HTTP/1.1")
                return
            if response is None:
                self._hand_over(buffer)
                return
            self.transport.write(response)
            if not keep_alive:
                self.transport.close()
                return
            buffer = buffer[end + 4 :]

    def _answer(self, head: bytes) -> tuple[bytes | None, bool]:
        self._url = b""
        self._if_none_match = b""
        self._origin = b""
        self._complete = False
        try:
            self.parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            return None, True
        except httptools.HttpParserError:
            raise _MalformedRequest from None
        # A request that announces a body is not complete at the blank line.
        if not self._complete:
            return None, True
        method = self.parser.get_method()
        if method not in (b"GET", b"HEAD"):
            return None, True
        match = TILE_TARGET.match(self._url)
        if match is None:
            return None, True
        keep_alive = self._keep_alive
        http_10 = self.parser.get_http_version() == "1.0"
        response = self.fast.respond(
            match,
            method.decode(),
            self._if_none_match,
            self._origin,
            keep_alive,
            http_10,
        )
        return response, keep_alive

    def _reject(self, status: int, code: str, message: str) -> None:
        """Send a JSON error like the aiohttp middleware's, then close."""
        body = json.dumps(
            {"error": code, "message": message, "status": status},
            separators=(",", ":"),
        ).encode()
        reason = http.HTTPStatus(status).phrase.encode()
        head = b"\r\n".join(
            [
                b"HTTP/1.1 %d %s" % (status, reason),
                b"Date: " + self.fast.date.now(),
                b"Content-Type: application/json; charset=utf-8",
                b"Content-Length: %d" % len(body),
                b"Cache-Control: no-store",
                b"Connection: close",
            ]
        )
        self.fast.rejected.inc()
        self.transport.write(head + b"\r\n\r\n" + body)
        self.transport.close()

    def _hand_over(self, unanswered: bytes) -> None:
        """Give the connection and its unanswered bytes to aiohttp for good."""
        transport = self.transport
        self.fast.connections.discard(self)
        self.transport = None
        handler = self.fast.handler_factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if unanswered:
            handler.data_received(unanswered)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
