"""The slide catalog and each slide's DeepZoom pyramid.

The catalog maps stable slide ids to files under the configured slide roots.
A request never names a path: ids are looked up in the map built by the
scan, and the scan skips anything that resolves outside its root.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import logging
import os
import posixpath
import threading
import time
from collections.abc import Iterator
from typing import Any

from tiled import metrics
from tiled.codecs import Tile
from tiled.config import Settings
from tiled.errors import NotFound, TiledError
from tiled.pyramid import DeepZoomGeometry, TileMaker
from tiled.readers import SLIDE_SUFFIXES, SlideReader, SourceIdentity, open_slide
from tiled.readers.base import fingerprint
from tiled.store import Store, StoreWriter, tile_key

log = logging.getLogger("tiled.slides")

# A catalog miss rescans the roots at most this often.
RESCAN_INTERVAL_SECONDS = 5.0


def slide_id_for(relative_path: str, secret: str = "") -> str:
    """Return the stable, URL-safe id of a slide from its path under its root.

    The id is a hash, so it does not show the file name and stays the same
    when the root folder moves. Without a secret anyone can hash a guessed
    path and compare. With ``slides.id_secret`` set (the same on every node)
    the hash is keyed, so a guess cannot be checked.
    """
    key = hashlib.sha256(secret.encode()).digest() if secret else b""
    digest = hashlib.blake2b(relative_path.encode(), digest_size=10, key=key).digest()
    return base64.b32encode(digest).decode().lower()


def default_store_path() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "tiled", "store")


class SlideEntry:
    """A slide file found by the scan, and its pyramid once opened."""

    def __init__(self, slide_id: str, root: str, relative_path: str) -> None:
        self.id = slide_id
        self.root = root
        self.relative_path = relative_path
        self.path = os.path.join(root, relative_path)
        self.name = os.path.basename(relative_path)
        self.identity: SourceIdentity | None = None
        self.pyramid: SlidePyramid | None = None
        self.error: TiledError | None = None
        self.lock = threading.Lock()


class ReaderCache:
    """Open readers, least recently used closed first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._readers: collections.OrderedDict[str, SlideReader] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, entry: SlideEntry) -> SlideReader:
        with self._lock:
            reader = self._readers.get(entry.id)
            if reader is not None:
                self._readers.move_to_end(entry.id)
                return reader
        reader = open_slide(entry.path)
        with self._lock:
            existing = self._readers.get(entry.id)
            if existing is not None:
                reader.close()
                return existing
            self._readers[entry.id] = reader
            while len(self._readers) > self.capacity:
                _, old = self._readers.popitem(last=False)
                old.close()
            metrics.OPEN_SLIDES.set(len(self._readers))
        return reader

    def drop(self, slide_id: str) -> None:
        with self._lock:
            reader = self._readers.pop(slide_id, None)
            metrics.OPEN_SLIDES.set(len(self._readers))
        if reader is not None:
            reader.close()

    def close(self) -> None:
        with self._lock:
            while self._readers:
                _, reader = self._readers.popitem()
                reader.close()
            metrics.OPEN_SLIDES.set(0)


def variant_name(tile_size: int, overlap: int, quality: int) -> str:
    """Name the DeepZoom parameters that decide a pyramid's tiles."""
    return f"dz{tile_size}o{overlap}q{quality}"


class SlidePyramid:
    """The DeepZoom pyramid of one slide in the store, made on demand."""

    def __init__(
        self,
        entry: SlideEntry,
        reader: SlideReader,
        store: Store,
        settings: Settings,
        readers: ReaderCache,
        writer: StoreWriter | None = None,
        ingest: bool = False,
    ) -> None:
        self.entry = entry
        self.store = store
        self.readers = readers
        self.writer = writer
        dz = settings.deepzoom
        native = reader.levels[0].tile_width
        self.tile_size = dz.tile_size or native
        self.overlap = dz.overlap
        self.jpeg_quality = dz.jpeg_quality
        self.geometry = DeepZoomGeometry(reader.levels, self.tile_size, self.overlap)
        self.variant = variant_name(self.tile_size, self.overlap, self.jpeg_quality)
        self.format = reader.format
        self.lossy = reader.is_lossy
        # Renders stored pixels for JPEG and PNG responses (channel windows
        # and colours of multichannel slides).
        self.to_display = reader.to_display
        record = slide_record(entry, reader)
        if ingest:
            # An ingest stages its tiles; the record changes when it finishes.
            self.record = record
            self.generation = store.begin_ingest(record)
            self.complete = False
        else:
            self.record = store.register_slide(record)
            self.generation = self.record["generation"]
            self.complete = self.variant in self.record.get("complete", [])

    @functools.cached_property
    def etag_prefix(self) -> str:
        """Hash of slide, generation and variant, shared by this pyramid's ETags."""
        text = f"{self.entry.id}/{self.generation}/{self.variant}"
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def key(self, z: int, t_col: int, t_row: int) -> bytes:
        return tile_key(self.entry.id, self.generation, self.variant, z, t_col, t_row)

    def cached(self, z: int, t_col: int, t_row: int) -> Tile | None:
        tile = self.store.get_tile(
            self.entry.id, self.generation, self.variant, z, t_col, t_row
        )
        if tile is None and self.writer is not None:
            tile = self.writer.pending(self.key(z, t_col, t_row))
        return tile

    def peek(self, z: int, t_col: int, t_row: int) -> Tile | None:
        """Return a stored or queued tile like ``cached``, without counting it."""
        tile = self.store.peek_tile(
            self.entry.id, self.generation, self.variant, z, t_col, t_row
        )
        if tile is None and self.writer is not None:
            tile = self.writer.pending(self.key(z, t_col, t_row))
        return tile

    def make(self, z: int, t_col: int, t_row: int) -> Tile:
        """Make a tile that is not in the store and queue it and what it needed."""
        made = self.make_many(z, t_col, t_row)
        items = [(self.key(*address), tile) for address, tile in made.items()]
        if self.writer is not None:
            self.writer.put(items)
        else:
            self.store.put_tiles(items)
        return made[(z, t_col, t_row)]

    def make_many(
        self, z: int, t_col: int, t_row: int
    ) -> dict[tuple[int, int, int], Tile]:
        """Make a tile and any finer tiles it needed; return all by address."""
        made: dict[tuple[int, int, int], Tile] = {}
        reader = self.readers.get(self.entry)

        def fetch(fz: int, fc: int, fr: int) -> Tile:
            address = (fz, fc, fr)
            tile = made.get(address)
            if tile is None:
                tile = self.cached(fz, fc, fr)
            if tile is None:
                tile = self._timed_make(maker, fz, fc, fr)
                made[address] = tile
            return tile

        maker = TileMaker(reader, self.geometry, self.jpeg_quality, fetch)
        made[(z, t_col, t_row)] = self._timed_make(maker, z, t_col, t_row)
        return made

    @staticmethod
    def _timed_make(maker: TileMaker, z: int, t_col: int, t_row: int) -> Tile:
        started = time.perf_counter()
        tile = maker.make(z, t_col, t_row)
        label = tile.codec.label
        metrics.TILES_GENERATED.labels(label).inc()
        metrics.TILE_GENERATION_DURATION.labels(label).observe(
            time.perf_counter() - started
        )
        return tile


def slide_record(entry: SlideEntry, reader: SlideReader) -> dict[str, Any]:
    """Describe a slide for the store: identity, geometry and safe metadata."""
    identity = reader.identity
    return {
        "id": entry.id,
        "name": entry.name,
        "format": reader.format,
        "source": {
            "path": identity.path,
            "size": identity.size,
            "mtime_ns": identity.mtime_ns,
            "fingerprint": fingerprint(identity.path),
        },
        "levels": [
            {
                "width": level.width,
                "height": level.height,
                "tile_width": level.tile_width,
                "tile_height": level.tile_height,
                "downsample": level.downsample,
            }
            for level in reader.levels
        ],
        "mpp": list(reader.mpp) if reader.mpp else None,
    }


class Catalog:
    """Slides under the configured roots, by id."""

    def __init__(
        self, settings: Settings, store: Store, writer: StoreWriter | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.roots = [os.path.realpath(root) for root in settings.slides.roots]
        self.readers = ReaderCache(settings.slides.open_slides)
        # Aliases map to the id the scan gives the file, so they resolve only
        # to slides found inside a root.
        self.aliases = {
            name: slide_id_for(
                posixpath.normpath(path.replace("\\", "/")), settings.slides.id_secret
            )
            for name, path in settings.slides.aliases.items()
        }
        self._entries: dict[str, SlideEntry] = {}
        self._last_scan = 0.0
        self._scan_lock = threading.Lock()

    def scan(self) -> None:
        """Find slide files under the roots; keep state of slides still present."""
        found: dict[str, SlideEntry] = {}
        for root in self.roots:
            for relative_path in walk_slides(root):
                slide_id = slide_id_for(relative_path, self.settings.slides.id_secret)
                if slide_id in found:
                    log.warning(
                        "slide id %s found under two roots; keeping the first", slide_id
                    )
                    continue
                entry = self._entries.get(slide_id)
                if entry is None or entry.path != os.path.join(root, relative_path):
                    entry = SlideEntry(slide_id, root, relative_path)
                found[slide_id] = entry
        with self._scan_lock:
            for slide_id in set(self._entries) - set(found):
                self.readers.drop(slide_id)
            self._entries = found
            self._last_scan = time.monotonic()
        metrics.SLIDES_KNOWN.set(len(found))

    def refresh_changed(self) -> None:
        """Forget the pyramid of any slide whose file changed since it was opened."""
        for entry in list(self._entries.values()):
            if entry.identity is None:
                continue
            try:
                identity = SourceIdentity.of(entry.path)
            except OSError:
                continue
            if identity != entry.identity:
                log.info("slide %s changed on disk; reopening it", entry.id)
                with entry.lock:
                    entry.pyramid = None
                    entry.error = None
                    entry.identity = None
                self.readers.drop(entry.id)

    def entries(self) -> Iterator[SlideEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.relative_path))

    def get(self, slide_id: str) -> SlideEntry:
        """Return the entry of a slide id or alias; raise NotFound if neither."""
        slide_id = self.aliases.get(slide_id, slide_id)
        entry = self._entries.get(slide_id)
        if (
            entry is None
            and time.monotonic() - self._last_scan > RESCAN_INTERVAL_SECONDS
        ):
            self.scan()
            entry = self._entries.get(slide_id)
        if entry is None:
            raise NotFound(f"no slide with id {slide_id!r}")
        return entry

    def open(self, entry: SlideEntry) -> SlidePyramid:
        """Return the slide's pyramid, opening the source on first use.

        Blocking: call from a worker thread. A slide that failed to open keeps
        its error, so a broken file is not reparsed on every request.
        """
        pyramid = entry.pyramid
        if pyramid is not None:
            return pyramid
        with entry.lock:
            if entry.pyramid is not None:
                return entry.pyramid
            if entry.error is not None:
                raise entry.error
            try:
                identity = SourceIdentity.of(entry.path)
                reader = self.readers.get(entry)
                pyramid = SlidePyramid(
                    entry, reader, self.store, self.settings, self.readers, self.writer
                )
            except TiledError as error:
                log.warning("slide %s cannot be opened: %s", entry.id, error)
                entry.error = error
                raise
            except OSError as error:
                raise NotFound(f"slide {entry.id} is no longer readable") from error
            entry.identity = identity
            entry.pyramid = pyramid
            return pyramid

    def close(self) -> None:
        self.readers.close()


def walk_slides(root: str) -> Iterator[str]:
    """Yield paths relative to root of slide files that stay inside the root.

    The files of one DICOM series in a folder (one instance per level, plus
    label and overview) form one slide. It is yielded once, as the series'
    first file by name, and the DICOM reader opens the rest from there.
    """
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        series_first: dict[str, str] = {}
        for name in sorted(files):
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            # DICOM files are often named by number, with no suffix.
            maybe_dicom = suffix in DICOM_SUFFIXES or not suffix or suffix[1:].isdigit()
            if suffix not in SLIDE_SUFFIXES and not maybe_dicom:
                continue
            path = os.path.join(directory, name)
            real = os.path.realpath(path)
            if os.path.commonpath([real, root]) != root:
                log.warning("skipping a slide link that leaves its root")
                continue
            if not os.path.isfile(real):
                continue
            if maybe_dicom:
                series_uid = _dicom_series_uid(real)
                if series_uid is None and suffix not in SLIDE_SUFFIXES:
                    continue
                if series_uid is not None:
                    if series_uid in series_first:
                        continue
                    series_first[series_uid] = name
            yield os.path.relpath(path, root).replace(os.sep, "/")


DICOM_SUFFIXES = {".dcm", ".dicom"}
# SeriesInstanceUID by path, with the file size and mtime it was read at.
_SERIES_UIDS: dict[str, tuple[int, int, str | None]] = {}


def _dicom_series_uid(path: str) -> str | None:
    """Return the SeriesInstanceUID of a DICOM file, or None if it is not one."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    cached = _SERIES_UIDS.get(path)
    if cached is not None and cached[:2] == (status.st_size, status.st_mtime_ns):
        return cached[2]
    from tiled.readers.dicom import is_dicom_file

    series_uid = None
    if is_dicom_file(path):
        try:
            import pydicom
        except ImportError:
            # Listed alone, so its error names the missing pydicom package.
            _SERIES_UIDS[path] = (status.st_size, status.st_mtime_ns, path)
            return path
        try:
            dataset = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
            )
            series_uid = str(dataset.get("SeriesInstanceUID", "")) or path
        except Exception:  # pydicom raises many types on damaged headers
            # A damaged DICOM file is still listed, so its error is shown.
            series_uid = path
    _SERIES_UIDS[path] = (status.st_size, status.st_mtime_ns, series_uid)
    return series_uid
