"""tiled: a whole-slide image tile cache and server."""

__version__ = "0.1.0"
