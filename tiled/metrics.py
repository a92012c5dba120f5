"""Prometheus metrics of the tiled daemon.

Label values are bounded: a route is one of ROUTES, a cache outcome one of
hit, miss or generated, a codec one of the store codec names. Slide ids, paths
and client addresses are never labels.
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram

from tiled import __version__

ROUTES = ("deepzoom", "iiif", "dicomweb", "region", "api", "viewer", "ops")

# Tile latency spans page-cache hits (well under 1 ms) to tiles decoded,
# resampled and encoded from the source file (up to seconds).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

HTTP_REQUESTS = Counter(
    "tiled_http_requests",
    "HTTP requests answered, by route and status class.",
    ["route", "method", "status_class"],
)
HTTP_REQUEST_DURATION = Histogram(
    "tiled_http_request_duration_seconds",
    "Time from request to response, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_RESPONSE_BYTES = Counter(
    "tiled_http_response_bytes",
    "Response body bytes sent, by route.",
    ["route"],
)
HTTP_IN_FLIGHT = Gauge(
    "tiled_http_requests_in_flight",
    "Requests being handled now.",
    multiprocess_mode="livesum",
)
TILES_SERVED = Counter(
    "tiled_tiles_served",
    "Tiles returned, by route, cache outcome, codec and pyramid level bucket.",
    ["route", "cache", "codec", "level_bucket"],
)
TILES_GENERATED = Counter(
    "tiled_tiles_generated",
    "Tiles made from the source file or from a finer level, by stored codec.",
    ["codec"],
)
TILE_GENERATION_DURATION = Histogram(
    "tiled_tile_generation_duration_seconds",
    "Time to make one tile that was not in the store.",
    ["codec"],
    buckets=LATENCY_BUCKETS,
)
TILE_ERRORS = Counter(
    "tiled_tile_errors",
    "Tiles that could not be read or decoded from the source, by reason.",
    ["reason"],
)
STORE_READS = Counter(
    "tiled_store_reads",
    "Store lookups, by result (hit or miss).",
    ["result"],
)
STORE_WRITES = Counter(
    "tiled_store_writes",
    "Tiles written to the store.",
)
STORE_WRITE_ERRORS = Counter(
    "tiled_store_write_errors",
    "Store write transactions that failed, by reason.",
    ["reason"],
)
STORE_SIZE = Gauge(
    "tiled_store_size_bytes",
    "Bytes of the LMDB data file in use (last page times page size).",
    multiprocess_mode="max",
)
STORE_MAP_SIZE = Gauge(
    "tiled_store_map_size_bytes",
    "Current LMDB map size, the most the store can hold before it grows.",
    multiprocess_mode="max",
)
STORE_MAP_LIMIT = Gauge(
    "tiled_store_map_limit_bytes",
    "Configured ceiling of the LMDB map size.",
    multiprocess_mode="max",
)
INGEST_TILES = Counter(
    "tiled_ingest_tiles",
    "Tiles written by ingest runs.",
)
INGEST_SLIDES = Counter(
    "tiled_ingest_slides",
    "Slide ingests finished, by result (complete or failed).",
    ["result"],
)
OPEN_SLIDES = Gauge(
    "tiled_open_slides",
    "Source slides held open by the reader cache.",
    multiprocess_mode="livesum",
)
SLIDES_KNOWN = Gauge(
    "tiled_slides",
    "Slides found under the configured slide roots.",
    multiprocess_mode="max",
)
EVENT_LOOP_LAG = Histogram(
    "tiled_event_loop_lag_seconds",
    "Delay of a periodic event-loop timer beyond its due time.",
    buckets=LATENCY_BUCKETS,
)
BUILD_INFO = Gauge(
    "tiled_build_info",
    "Always 1; the labels carry the tiled and Python versions.",
    ["version", "python"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)


def level_bucket(levels_below_full: int) -> str:
    """Return the level bucket label: 0 is full resolution, larger is coarser."""
    if levels_below_full <= 0:
        return "0"
    if levels_below_full <= 2:
        return "1-2"
    if levels_below_full <= 5:
        return "3-5"
    return "6+"
