"""Settings of the daemon and the CLI.

Sources apply in this order, each overriding the one before: the defaults
below, the YAML file given with ``--config`` (or named by ``TILED_CONFIG``),
``TILED_<SECTION>_<KEY>`` environment variables, then command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# Characters an alias may use: URL-safe without escaping in a path segment.
ALIAS_NAME = re.compile(r"[A-Za-z0-9._~-]{1,128}")


class ConfigError(ValueError):
    """Raised if a configuration file or variable is invalid."""


@dataclasses.dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Worker processes sharing one listening socket; 1 serves in-process.
    workers: int = 1
    # Largest number of source decodes and encodes running at once per worker.
    threads: int = 4
    # Access log lines cost throughput on hot tiles, so they are off by default.
    access_log: bool = False
    # Origins allowed by CORS; "*" lets any browser viewer fetch tiles.
    cors_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    # Cache-Control max-age of tiles and other content-addressed responses.
    tile_max_age_seconds: int = 86400
    # Serve DeepZoom JPEG tiles already in the store before aiohttp parses the
    # request (see tiled/fastpath.py). Off when access_log is on.
    fast_path: bool = True


@dataclasses.dataclass
class SlidesSettings:
    # Folders searched (recursively) for slide files.
    roots: list[str] = dataclasses.field(default_factory=list)
    # Source slides kept open at once per worker.
    open_slides: int = 64
    # Serve label and macro images of every slide. They often show the
    # patient's name. Thumbnails are always served.
    associated_images: bool = False
    # Folders (slide roots or folders under them) whose slides serve label
    # and macro images even when associated_images is false, for collections
    # known to hold no patient data.
    associated_image_folders: list[str] = dataclasses.field(default_factory=list)
    # Show each slide's file name in the slide list and metadata. Off by
    # default because archives often name files by accession number or
    # patient name; slides are then listed by id.
    show_file_names: bool = False
    # Key of the slide-id hash. Empty keeps ids reproducible from paths alone.
    # Set it, the same on every node and for tiled ingest, so that an id cannot
    # be checked against a guessed file name. Changing it changes every id.
    id_secret: str = ""
    # Extra ids for slides, as {alias: path relative to a root}, so a fixed
    # identifier (an IIIF test image, a DICOM viewer's bookmark) can name a file.
    # An alias only resolves to a file the root scan found, so it cannot reach
    # outside the roots. As an environment variable: "name=path,name=path".
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StoreSettings:
    # LMDB environment folder; empty means ~/.cache/tiled/store.
    path: str = ""
    # First LMDB map size; the map doubles when full, up to max_map_size_bytes.
    map_size_bytes: int = 1 << 30
    max_map_size_bytes: int = 1 << 42
    # Bytes of re-encoded tiles (JPEG from lossless pixels, PNG from JPEG) kept
    # in memory per worker.
    memory_cache_bytes: int = 256 << 20


@dataclasses.dataclass
class DeepZoomSettings:
    # Tile edge in pixels; 0 uses each slide's native tile size.
    tile_size: int = 0
    overlap: int = 0
    # Quality of tiles tiled encodes (re-cut, downsampled or from lossless data).
    jpeg_quality: int = 90


@dataclasses.dataclass
class LimitsSettings:
    # Largest image one IIIF, region or thumbnail response may have, in pixels.
    # A request reads at most twice max_area pixels, so these bound the read of
    # one request at about 3 bytes x 2 x max_area (100 MB at the default).
    max_width: int = 8192
    max_height: int = 8192
    max_area: int = 16_777_216
    # Tiles one batch request may ask for.
    batch_max_tiles: int = 256


@dataclasses.dataclass
class Settings:
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    slides: SlidesSettings = dataclasses.field(default_factory=SlidesSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    deepzoom: DeepZoomSettings = dataclasses.field(default_factory=DeepZoomSettings)
    limits: LimitsSettings = dataclasses.field(default_factory=LimitsSettings)

    def validate(self) -> None:
        """Raise ConfigError if a value is out of range."""
        if not 0 < self.server.port < 65536:
            raise ConfigError(f"server.port must be 1-65535, got {self.server.port}")
        if self.server.workers < 1:
            raise ConfigError("server.workers must be at least 1")
        if self.server.threads < 1:
            raise ConfigError("server.threads must be at least 1")
        if self.deepzoom.tile_size and not 16 <= self.deepzoom.tile_size <= 4096:
            raise ConfigError("deepzoom.tile_size must be 0 (native) or 16-4096")
        if not 0 <= self.deepzoom.overlap <= 64:
            raise ConfigError("deepzoom.overlap must be 0-64")
        if not 1 <= self.deepzoom.jpeg_quality <= 100:
            raise ConfigError("deepzoom.jpeg_quality must be 1-100")
        if self.store.map_size_bytes < 1 << 20:
            raise ConfigError("store.map_size_bytes must be at least 1 MiB")
        if self.slides.open_slides < 1:
            raise ConfigError("slides.open_slides must be at least 1")
        for name, path in self.slides.aliases.items():
            if not ALIAS_NAME.fullmatch(name):
                raise ConfigError(
                    f"slides.aliases: invalid alias {name!r}; use 1-128 letters, "
                    "digits, '.', '_', '~' or '-'"
                )
            parts = path.replace("\\", "/").split("/")
            if path.startswith("/") or ".." in parts or not path:
                raise ConfigError(
                    f"slides.aliases.{name}: {path!r} must be a relative path "
                    "inside a slide root, without '..'"
                )
        limits = self.limits
        if min(limits.max_width, limits.max_height, limits.max_area) < 1:
            raise ConfigError("limits.max_width, max_height and max_area must be >= 1")
        if not 1 <= limits.batch_max_tiles <= 10000:
            raise ConfigError("limits.batch_max_tiles must be 1-10000")


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Convert a YAML or environment value to the type of its default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if isinstance(default, dict):
            if isinstance(value, str):
                pairs = (part.split("=", 1) for part in value.split(",") if part)
                value = {key.strip(): path.strip() for key, path in pairs}
            if not isinstance(value, Mapping):
                raise ValueError(value)
            return {str(key): str(item) for key, item in value.items()}
        if isinstance(default, list):
            if isinstance(value, str):
                # Folder lists split like PATH; origins hold colons, so commas.
                separator = "," if name.endswith("cors_origins") else os.pathsep
                return [part.strip() for part in value.split(separator) if part]
            return [str(item) for item in value]
        return str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None


def _apply(settings: Settings, data: Mapping[str, Any], origin: str) -> None:
    for section_name, section_values in data.items():
        section = getattr(settings, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"{origin}: unknown section {section_name!r}")
        if not isinstance(section_values, Mapping):
            raise ConfigError(f"{origin}: section {section_name!r} must be a mapping")
        for key, value in section_values.items():
            if not hasattr(section, key):
                raise ConfigError(f"{origin}: unknown key {section_name}.{key}")
            default = getattr(section, key)
            name = f"{section_name}.{key}"
            setattr(section, key, _coerce(value, default, name))


def _from_environment(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    data: dict[str, dict[str, str]] = {}
    defaults = Settings()
    for field in dataclasses.fields(defaults):
        for sub in dataclasses.fields(getattr(defaults, field.name)):
            variable = f"TILED_{field.name}_{sub.name}".upper()
            if variable in environ:
                data.setdefault(field.name, {})[sub.name] = environ[variable]
    return data


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build Settings from defaults, a YAML file, the environment and overrides."""
    environ = os.environ if environ is None else environ
    settings = Settings()
    config_file = config_file or environ.get("TILED_CONFIG") or None
    if config_file:
        path = Path(config_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"cannot read configuration file {path}: {error.strerror}"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _apply(settings, data, str(path))
    _apply(settings, _from_environment(environ), "environment")
    if overrides:
        _apply(settings, overrides, "command line")
    settings.validate()
    return settings


def default_config_yaml() -> str:
    """Return the default settings as a YAML document."""
    return yaml.safe_dump(dataclasses.asdict(Settings()), sort_keys=False)
