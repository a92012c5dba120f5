"""The LMDB tile store.

One LMDB environment per store folder with three named databases:

``slides``
    slide id -> JSON record: source identity, geometry, the current
    generation and the pyramid variants known to be complete.
``tiles``
    ``{slide_id}/{generation:x}/{variant}/{level}/{col}_{row}`` -> tile value
    (see ``tiled.codecs.Tile``). Text keys keep a slide's tiles contiguous,
    so a prefix scan finds or deletes them.
``ingest``
    slide id -> JSON record of an ingest in progress: the generation its
    tiles are staged under and the source identity they come from.

A slide record names one generation; readers use only tiles of that
generation. An ingest of a new or changed source writes its tiles under a
fresh generation and, in one final transaction, points the slide record at
it. A reader therefore sees the old slide or the whole new one, also after a
crash, and a rerun finds the staged tiles and goes on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lmdb

from tiled import metrics
from tiled.codecs import Tile
from tiled.errors import StoreError, StoreFull

log = logging.getLogger("tiled.store")

# A failed write with less free space than this is blamed on a full disk.
DISK_FULL_MARGIN_BYTES = 64 << 20

_SLIDES = b"slides"
_TILES = b"tiles"
_INGEST = b"ingest"


def tile_key(
    slide_id: str, generation: int, variant: str, level: int, col: int, row: int
) -> bytes:
    return f"{slide_id}/{generation:x}/{variant}/{level}/{col}_{row}".encode()


def _slide_prefix(slide_id: str) -> bytes:
    return f"{slide_id}/".encode()


class Store:
    """An LMDB environment holding pyramids of many slides.

    Safe to share between threads. Several processes may open the same store:
    LMDB serialises writers across processes, and a map grown by one process
    is adopted by the others on their next transaction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int = 1 << 30,
        max_map_size: int = 1 << 42,
        readonly: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.max_map_size = max(max_map_size, map_size)
        self.readonly = readonly
        try:
            if not readonly:
                os.makedirs(self.path, exist_ok=True)
            self.env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=4,
                subdir=True,
                readonly=readonly,
                # Readahead wastes page-cache on random tile reads.
                readahead=False,
                # Without the meta-page fsync a crash can lose the last
                # commits but never breaks the database.
                metasync=False,
                max_readers=512,
                lock=True,
            )
            self._slides = self.env.open_db(_SLIDES, create=not readonly)
            self._tiles = self.env.open_db(_TILES, create=not readonly)
            self._ingest = self.env.open_db(_INGEST, create=not readonly)
        except lmdb.Error as error:
            raise StoreError(f"cannot open the tile store: {error}") from None
        # Growing the map needs no transaction open in this process, so readers
        # and the resize share this lock. Read transactions last microseconds.
        self._lock = threading.Lock()
        metrics.STORE_MAP_LIMIT.set(self.max_map_size)
        self.update_gauges()

    def close(self) -> None:
        self.env.close()

    # Reads

    def _read(
        self, db: Any, key: bytes, convert: Callable[[memoryview], Any] = bytes
    ) -> Any:
        """Return ``convert`` of the value under a key, or None if it is absent.

        The value is a buffer into the map, valid only inside the transaction,
        so ``convert`` makes the one copy that outlives it.
        """
        for _ in range(2):
            try:
                with self._lock, self.env.begin(db=db, buffers=True) as txn:
                    value = txn.get(key)
                    return None if value is None else convert(value)
            except lmdb.MapResizedError:
                with self._lock:
                    self.env.set_mapsize(0)
        raise StoreError("the tile store map keeps changing size")

    def get_tile(
        self,
        slide_id: str,
        generation: int,
        variant: str,
        level: int,
        col: int,
        row: int,
    ) -> Tile | None:
        tile = self.peek_tile(slide_id, generation, variant, level, col, row)
        metrics.STORE_READS.labels("miss" if tile is None else "hit").inc()
        return tile

    def peek_tile(
        self,
        slide_id: str,
        generation: int,
        variant: str,
        level: int,
        col: int,
        row: int,
    ) -> Tile | None:
        """Look a tile up like get_tile, without counting the read."""
        key = tile_key(slide_id, generation, variant, level, col, row)
        return self._read(self._tiles, key, Tile.unpack)

    def has_tile(
        self,
        slide_id: str,
        generation: int,
        variant: str,
        level: int,
        col: int,
        row: int,
    ) -> bool:
        key = tile_key(slide_id, generation, variant, level, col, row)
        return self._read(self._tiles, key) is not None

    def get_slide(self, slide_id: str) -> dict[str, Any] | None:
        value = self._read(self._slides, slide_id.encode())
        return None if value is None else json.loads(value)

    def get_ingest(self, slide_id: str) -> dict[str, Any] | None:
        value = self._read(self._ingest, slide_id.encode())
        return None if value is None else json.loads(value)

    def list_slides(self) -> list[dict[str, Any]]:
        with self._lock, self.env.begin(db=self._slides) as txn:
            return [json.loads(value) for _, value in txn.cursor()]

    def count_tiles(self, slide_id: str, generation: int | None = None) -> int:
        prefix = _slide_prefix(slide_id)
        if generation is not None:
            prefix += f"{generation:x}/".encode()
        count = 0
        with self._lock, self.env.begin(db=self._tiles) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    count += 1
        return count

    # Writes

    def _write(self, work: Any) -> Any:
        """Run ``work(txn)`` in a write transaction, growing the map when full."""
        if self.readonly:
            raise StoreError("the tile store is open read-only")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                with self._lock:
                    self.env.set_mapsize(0)
            except lmdb.Error as error:
                # LMDB reports a short write on a full disk as EIO, so the
                # free space decides whether the disk is the cause.
                if getattr(error, "errno", None) == errno.ENOSPC or self._disk_full():
                    metrics.STORE_WRITE_ERRORS.labels("disk_full").inc()
                    raise StoreFull(
                        "the tile store's disk is full; free space or move the store"
                    ) from None
                metrics.STORE_WRITE_ERRORS.labels("lmdb").inc()
                raise StoreError(f"tile store write failed: {error}") from None

    def _disk_full(self) -> bool:
        try:
            status = os.statvfs(self.path)
        except OSError:
            return False
        return status.f_bavail * status.f_frsize < DISK_FULL_MARGIN_BYTES

    def _grow(self) -> None:
        current = self.env.info()["map_size"]
        if current >= self.max_map_size:
            metrics.STORE_WRITE_ERRORS.labels("map_full").inc()
            raise StoreFull(
                f"the tile store reached its map size ceiling ({current} bytes); "
                "raise store.max_map_size_bytes"
            )
        new_size = min(current * 2, self.max_map_size)
        with self._lock:
            self.env.set_mapsize(new_size)
        log.info("tile store map grown from %d to %d bytes", current, new_size)
        self.update_gauges()

    def put_tiles(self, items: Iterable[tuple[bytes, Tile]]) -> int:
        """Write tiles given as (key, tile) in one transaction; return the count."""
        packed = [(key, tile.pack()) for key, tile in items]
        if not packed:
            return 0

        def work(txn: lmdb.Transaction) -> int:
            for key, value in packed:
                txn.put(key, value, db=self._tiles)
            return len(packed)

        written = self._write(work)
        metrics.STORE_WRITES.inc(written)
        return written

    def register_slide(self, record: dict[str, Any]) -> dict[str, Any]:
        """Return the stored record for this slide's source, creating it if needed.

        A record for the same source identity is returned as it is. A changed
        or new source gets a new generation with no complete variants, and
        tiles of older generations are deleted.
        """
        slide_id = record["id"]

        def work(txn: lmdb.Transaction) -> dict[str, Any]:
            value = txn.get(slide_id.encode(), db=self._slides)
            old = json.loads(value) if value else None
            if old is not None and old["source"] == record["source"]:
                return old
            staged = txn.get(slide_id.encode(), db=self._ingest)
            staged_generation = json.loads(staged)["generation"] if staged else 0
            generation = max(old["generation"] if old else 0, staged_generation) + 1
            new = dict(record, generation=generation, complete=[])
            txn.put(slide_id.encode(), json.dumps(new).encode(), db=self._slides)
            if staged:
                txn.delete(slide_id.encode(), db=self._ingest)
            self._delete_generations(txn, slide_id, keep={generation})
            return new

        return self._write(work)

    def begin_ingest(self, record: dict[str, Any]) -> int:
        """Return the generation an ingest of this source writes its tiles to."""
        slide_id = record["id"]

        def work(txn: lmdb.Transaction) -> int:
            value = txn.get(slide_id.encode(), db=self._slides)
            current = json.loads(value) if value else None
            if current is not None and current["source"] == record["source"]:
                return current["generation"]
            staged = txn.get(slide_id.encode(), db=self._ingest)
            staged = json.loads(staged) if staged else None
            if staged is not None and staged["source"] == record["source"]:
                return staged["generation"]
            highest = max(
                current["generation"] if current else 0,
                staged["generation"] if staged else 0,
            )
            generation = highest + 1
            state = {"generation": generation, "source": record["source"]}
            txn.put(slide_id.encode(), json.dumps(state).encode(), db=self._ingest)
            keep = {generation}
            if current is not None:
                keep.add(current["generation"])
            self._delete_generations(txn, slide_id, keep=keep)
            return generation

        return self._write(work)

    def finish_ingest(
        self, record: dict[str, Any], generation: int, variant: str
    ) -> None:
        """Point the slide at the ingested generation and mark the variant complete."""
        slide_id = record["id"]

        def work(txn: lmdb.Transaction) -> None:
            value = txn.get(slide_id.encode(), db=self._slides)
            current = json.loads(value) if value else None
            complete = set()
            if current is not None and current["generation"] == generation:
                complete.update(current.get("complete", []))
            complete.add(variant)
            new = dict(record, generation=generation, complete=sorted(complete))
            txn.put(slide_id.encode(), json.dumps(new).encode(), db=self._slides)
            txn.delete(slide_id.encode(), db=self._ingest)
            self._delete_generations(txn, slide_id, keep={generation})

        self._write(work)
        self.env.sync(True)

    def _delete_generations(
        self, txn: lmdb.Transaction, slide_id: str, keep: set[int]
    ) -> int:
        prefix = _slide_prefix(slide_id)
        keep_prefixes = tuple(prefix + f"{g:x}/".encode() for g in keep)
        cursor = txn.cursor(db=self._tiles)
        deleted = 0
        if not cursor.set_range(prefix):
            return 0
        while True:
            key = cursor.key()
            if not key.startswith(prefix):
                break
            if key.startswith(keep_prefixes):
                if not cursor.next():
                    break
                continue
            # delete() moves the cursor to the next item.
            if not cursor.delete():
                break
            deleted += 1
        if deleted:
            log.info("deleted %d stale tiles of slide %s", deleted, slide_id)
        return deleted

    def delete_slide(self, slide_id: str) -> None:
        def work(txn: lmdb.Transaction) -> None:
            txn.delete(slide_id.encode(), db=self._slides)
            txn.delete(slide_id.encode(), db=self._ingest)
            self._delete_generations(txn, slide_id, keep=set())

        self._write(work)

    # Accounting

    def usage(self) -> dict[str, int]:
        info = self.env.info()
        stat = self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {
            "map_size": info["map_size"],
            "used": used,
            "max_map_size": self.max_map_size,
        }

    def update_gauges(self) -> None:
        usage = self.usage()
        metrics.STORE_SIZE.set(usage["used"])
        metrics.STORE_MAP_SIZE.set(usage["map_size"])

    def iter_tile_keys(self, slide_id: str) -> Iterator[bytes]:
        prefix = _slide_prefix(slide_id)
        with self._lock, self.env.begin(db=self._tiles) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    yield bytes(key)


class StoreWriter:
    """Writes tiles made on request in batches from one background thread.

    Every commit syncs the data file, so one commit per tile would cost a
    disk flush per request; batching shares it. Tiles queued but not yet
    committed are found by ``pending`` so a repeat request does not remake
    them.
    """

    def __init__(
        self, store: Store, max_batch: int = 256, max_delay_seconds: float = 0.05
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_delay = max_delay_seconds
        self._pending: dict[bytes, Tile] = {}
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="tiled-store-writer", daemon=True
        )
        self._thread.start()

    def pending(self, key: bytes) -> Tile | None:
        return self._pending.get(key)

    def put(self, items: Iterable[tuple[bytes, Tile]]) -> None:
        with self._condition:
            for key, tile in items:
                self._pending[key] = tile
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending and self._closed:
                    return
            # Let more tiles gather unless the batch is already full.
            if len(self._pending) < self.max_batch and not self._closed:
                threading.Event().wait(self.max_delay)
            with self._condition:
                batch = list(self._pending.items())[: self.max_batch * 4]
            try:
                self.store.put_tiles(batch)
            except StoreError as error:
                log.error(
                    "dropping %d tiles that could not be stored: %s", len(batch), error
                )
            with self._condition:
                for key, tile in batch:
                    if self._pending.get(key) is tile:
                        del self._pending[key]

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued tile is committed or dropped."""
        deadline = threading.Event()
        waited = 0.0
        while self._pending and waited < timeout:
            deadline.wait(0.01)
            waited += 0.01

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=30)
