"""Ingest: fill a slide's whole DeepZoom pyramid into the store ahead of time.

Levels are made from full resolution down to 1x1, so a level the source
lacks always finds the finer level already stored. Tiles are written in
batches under a staged generation. The slide record moves to it only in the
last transaction, and a rerun skips tiles already staged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from tiled import metrics
from tiled.codecs import Tile
from tiled.config import Settings
from tiled.slides import ReaderCache, SlideEntry, SlidePyramid, slide_id_for
from tiled.store import Store

log = logging.getLogger("tiled.ingest")

BATCH_TILES = 256
BATCH_BYTES = 32 << 20

Progress = Callable[[int], None]


def entry_for(path: str, roots: list[str], secret: str = "") -> SlideEntry:
    """Return the catalog entry of a slide file, with the id the daemon gives it.

    The id comes from the path under the configured root that contains the
    file, or under the file's own folder when no root does. ``secret`` is the
    daemon's ``slides.id_secret``.
    """
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if os.path.commonpath([real, root]) == root:
            relative = os.path.relpath(real, root).replace(os.sep, "/")
            return SlideEntry(slide_id_for(relative, secret), root, relative)
    root, name = os.path.split(real)
    return SlideEntry(slide_id_for(name, secret), root, name)


def count_tiles(pyramid: SlidePyramid) -> int:
    return sum(cols * rows for cols, rows in pyramid.geometry.level_tiles)


def ingest_slide(
    entry: SlideEntry,
    store: Store,
    settings: Settings,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Store every DeepZoom tile of one slide; return counts of made and kept tiles."""
    readers = ReaderCache(1)
    try:
        reader = readers.get(entry)
        pyramid = SlidePyramid(entry, reader, store, settings, readers, ingest=True)
        made = skipped = 0
        batch: list[tuple[bytes, Tile]] = []
        batch_bytes = 0
        staged: dict[tuple[int, int, int], Tile] = {}
        geometry = pyramid.geometry

        def flush() -> None:
            nonlocal batch, batch_bytes
            store.put_tiles(batch)
            metrics.INGEST_TILES.inc(len(batch))
            batch = []
            batch_bytes = 0
            staged.clear()

        for z in range(geometry.level_count - 1, -1, -1):
            cols, rows = geometry.level_tiles[z]
            for t_row in range(rows):
                for t_col in range(cols):
                    if store.has_tile(
                        entry.id, pyramid.generation, pyramid.variant, z, t_col, t_row
                    ):
                        skipped += 1
                    else:
                        tiles = pyramid.make_many(z, t_col, t_row)
                        for address, tile in tiles.items():
                            if address in staged:
                                continue
                            staged[address] = tile
                            batch.append((pyramid.key(*address), tile))
                            batch_bytes += len(tile.data)
                        made += 1
                        if len(batch) >= BATCH_TILES or batch_bytes >= BATCH_BYTES:
                            flush()
                    if progress is not None:
                        progress(1)
            # The next, coarser level reads this one back from the store.
            if batch:
                flush()
        store.finish_ingest(pyramid.record, pyramid.generation, pyramid.variant)
        metrics.INGEST_SLIDES.labels("complete").inc()
        return {"made": made, "skipped": skipped, "total": count_tiles(pyramid)}
    except BaseException:
        metrics.INGEST_SLIDES.labels("failed").inc()
        raise
    finally:
        readers.close()
