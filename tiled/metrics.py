"""Prometheus metrics of the tiled daemon.

Label values are bounded: a route is one of ROUTES, a cache outcome one of
hit, miss or generated, a codec one of the store codec names. Slide ids, paths
and client addresses are never labels.

With several worker processes the metrics use prometheus_client's multiprocess
mode (see setup_multiprocess). Its limits, and how this module handles them:

- The value class is chosen when a metric is created, so metrics made at import
  time are in-memory. setup_multiprocess() rebinds them to per-process files
  before the parent forks, so the caller need not set the environment first.
- Counters and histograms of a worker that exited stay in its files, so totals
  never drop when a worker is replaced. Gauges use a ``live*`` mode where a dead
  worker's value would be wrong, and mark_worker_dead() deletes those files.
- Files are never compacted: every worker pid adds one file per metric type,
  and a scrape reads them all. The parent deletes them at each start.
- Process and Python runtime metrics (``process_*``, ``python_gc_*``) are not
  exported, because each worker could only report itself. Use node_exporter.
- Gauge.set_function() and exemplars do not work in multiprocess mode, and
  Gauge.inc()/dec() are not allowed on the ``mostrecent`` gauges below. Such a
  gauge is missing from /metrics until a live worker has set it.
- With PROMETHEUS_MULTIPROC_DIR set in the environment the metrics are
  file-backed even with one worker, and only setup_multiprocess() empties the
  folder, so call it whenever the variable is set.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
    write_to_textfile,
)

from tiled import __version__

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The text format exposes each counter's creation time as an extra series, which
# Prometheus stores but nothing here reads.
disable_created_metrics()

# With PROMETHEUS_MULTIPROC_DIR set before this import, prometheus_client opens
# a file in that folder for each metric below and fails if the folder is missing.
if os.environ.get(MULTIPROC_ENV):
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

ROUTES = ("deepzoom", "iiif", "dicomweb", "region", "api", "viewer", "ops")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")

# Prometheus text exposition format 0.0.4, spelled out because newer
# prometheus_client versions advertise 1.0.0 in CONTENT_TYPE_LATEST.
CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# Tile latency spans page-cache hits (well under 1 ms) to tiles decoded,
# resampled and encoded from the source file (up to seconds). The alert rules
# use the 0.25 s bucket as the latency objective, so keep that boundary.
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
# Every worker reads the same LMDB environment, so the most recent reading of
# any live worker is the current one.
STORE_SIZE = Gauge(
    "tiled_store_size_bytes",
    "Bytes of the LMDB data file in use (last page times page size).",
    multiprocess_mode="livemostrecent",
)
STORE_MAP_SIZE = Gauge(
    "tiled_store_map_size_bytes",
    "Current LMDB map size, the most the store can hold before it grows.",
    multiprocess_mode="livemostrecent",
)
STORE_MAP_LIMIT = Gauge(
    "tiled_store_map_limit_bytes",
    "Configured ceiling of the LMDB map size.",
    multiprocess_mode="livemostrecent",
)
# `tiled ingest` is a short-lived command that Prometheus cannot scrape, so it
# hands these two to node_exporter through write_ingest_textfile().
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
    multiprocess_mode="livemostrecent",
)
EVENT_LOOP_LAG = Histogram(
    "tiled_event_loop_lag_seconds",
    "Delay of a periodic event-loop timer beyond its due time.",
    buckets=LATENCY_BUCKETS,
)
WORKER_EXITS = Counter(
    "tiled_worker_exits",
    "Worker processes that exited and were reported by the parent.",
)
BUILD_INFO = Gauge(
    "tiled_build_info",
    "Always 1; the labels carry the tiled and Python versions.",
    ["version", "python"],
    multiprocess_mode="max",
)

ALL_METRICS = (
    HTTP_REQUESTS,
    HTTP_REQUEST_DURATION,
    HTTP_RESPONSE_BYTES,
    HTTP_IN_FLIGHT,
    TILES_SERVED,
    TILES_GENERATED,
    TILE_GENERATION_DURATION,
    TILE_ERRORS,
    STORE_READS,
    STORE_WRITES,
    STORE_WRITE_ERRORS,
    STORE_SIZE,
    STORE_MAP_SIZE,
    STORE_MAP_LIMIT,
    INGEST_TILES,
    INGEST_SLIDES,
    OPEN_SLIDES,
    SLIDES_KNOWN,
    EVENT_LOOP_LAG,
    WORKER_EXITS,
    BUILD_INFO,
)


def _initialize_series() -> None:
    """Create the series of small fixed label sets at zero.

    A series that does not exist yet makes ratios such as the 5xx error ratio
    return no data instead of 0, so the known label values start at zero.
    """
    for route in ROUTES:
        for status_class in STATUS_CLASSES:
            HTTP_REQUESTS.labels(route, "GET", status_class)
        HTTP_REQUEST_DURATION.labels(route)
        HTTP_RESPONSE_BYTES.labels(route)
    for result in ("hit", "miss"):
        STORE_READS.labels(result)
    for result in ("complete", "failed"):
        INGEST_SLIDES.labels(result)
    BUILD_INFO.labels(__version__, platform.python_version()).set(1)


_initialize_series()


def level_bucket(levels_below_full: int) -> str:
    """Return the level bucket label: 0 is full resolution, larger is coarser."""
    if levels_below_full <= 0:
        return "0"
    if levels_below_full <= 2:
        return "1-2"
    if levels_below_full <= 5:
        return "3-5"
    return "6+"


def multiprocess_directory() -> str | None:
    """Return the multiprocess metrics folder, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def setup_multiprocess(directory: str | os.PathLike[str]) -> None:
    """Switch every tiled metric to prometheus_client's multiprocess mode.

    Call it in the parent before forking the workers. It creates ``directory``
    or deletes the ``*.db`` metric files in it (values left by an earlier run
    would be added to this run's), sets PROMETHEUS_MULTIPROC_DIR for the
    workers, and rebinds the metrics created at import time to per-process
    files. Values recorded before the call are lost. Other files in the folder
    are kept, in case the variable names a shared folder by mistake.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()

    # clear() warns once the variable is set, so drop the labelled children
    # before setting it. They are created again below or on first use.
    for metric in ALL_METRICS:
        if metric._labelnames:
            metric.clear()
    os.environ[MULTIPROC_ENV] = str(path)
    values.ValueClass = values.MultiProcessValue()
    for metric in ALL_METRICS:
        if not metric._labelnames:
            # NOTE: _metric_init() is private in prometheus_client, checked up to
            # 0.26. It gives an unlabelled metric a value of the new class.
            metric._metric_init()
    _initialize_series()
    log.info("multiprocess metrics enabled in %s", path)


def mark_worker_dead(pid: int) -> None:
    """Delete the live gauge files of an exited worker and count the exit.

    Call it in the parent once it has reaped the worker. Counters and
    histograms of the worker stay, so totals keep their values.
    """
    directory = multiprocess_directory()
    if directory is None:
        raise RuntimeError("mark_worker_dead() needs setup_multiprocess() first")
    multiprocess.mark_process_dead(pid, directory)
    WORKER_EXITS.inc()


def render_metrics() -> tuple[bytes, str]:
    """Return the /metrics body and its content type.

    In multiprocess mode the body merges the files of every worker, so any
    worker that accepts the scrape returns the same totals.
    """
    directory = multiprocess_directory()
    if directory is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_TEXT
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry), CONTENT_TYPE_TEXT


def write_ingest_textfile(path: str | os.PathLike[str]) -> None:
    """Write the ingest counters for node_exporter's textfile collector.

    ``path`` must end in ``.prom`` and sit in the folder node_exporter reads
    (--collector.textfile.directory). prometheus_client writes a temporary file
    and renames it, so node_exporter never reads a partial file. The series get
    job="node" when Prometheus scrapes them.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(INGEST_TILES)
    registry.register(INGEST_SLIDES)
    write_to_textfile(str(path), registry)
