"""Exceptions of tiled.

Every error a client can cause maps to one HTTP status. Its message names the
problem in words safe to show a client, never a file path.
"""

from __future__ import annotations


class TiledError(Exception):
    """Base of tiled's errors. ``status`` is the HTTP status of the response."""

    status = 500
    code = "internal_error"


class BadRequest(TiledError):
    """Raised if a request is malformed or requests something impossible."""

    status = 400
    code = "bad_request"


class NotFound(TiledError):
    """Raised if a slide, level or tile does not exist."""

    status = 404
    code = "not_found"


class Forbidden(TiledError):
    """Raised if a resource exists but configuration withholds it."""

    status = 403
    code = "forbidden"


class UnsupportedSlide(TiledError):
    """Raised if no reader accepts a file, or a reader cannot handle its layout."""

    status = 415
    code = "unsupported_slide"


class CorruptSlide(TiledError):
    """Raised if a slide file or one of its tiles cannot be read or decoded.

    ``reason`` is a short fixed word (such as "truncated", "decode" or
    "invalid_jpeg") used as the label of the tile error metric.
    """

    status = 422
    code = "corrupt_slide"

    def __init__(self, message: str = "", reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(TiledError):
    """Raised if the LMDB store cannot be opened or written."""

    status = 503
    code = "store_unavailable"


class StoreFull(StoreError):
    """Raised if the store's disk or map ceiling leaves no room for a write."""

    code = "store_full"
