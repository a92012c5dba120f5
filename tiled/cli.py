"""The ``tiled`` command: serve, ingest, info and demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from typing import Any

from tiled import __version__
from tiled.config import ConfigError, Settings, load_settings

log = logging.getLogger("tiled")

DEMO_SIZE = (7937, 5411)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    if getattr(args, "host", None):
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None):
        overrides.setdefault("server", {})["port"] = args.port
    if getattr(args, "workers", None):
        overrides.setdefault("server", {})["workers"] = args.workers
    if getattr(args, "store", None):
        overrides.setdefault("store", {})["path"] = args.store
    if getattr(args, "slide_dirs", None):
        overrides.setdefault("slides", {})["roots"] = list(args.slide_dirs)
    if getattr(args, "tile_size", None) is not None:
        overrides.setdefault("deepzoom", {})["tile_size"] = args.tile_size
    if getattr(args, "overlap", None) is not None:
        overrides.setdefault("deepzoom", {})["overlap"] = args.overlap
    if getattr(args, "quality", None) is not None:
        overrides.setdefault("deepzoom", {})["jpeg_quality"] = args.quality
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, overrides=_overrides(args))


def _fail(message: str, code: int = 2) -> int:
    print(f"tiled: error: {message}", file=sys.stderr)
    return code


def _serve(settings: Settings) -> int:
    for root in settings.slides.roots:
        if not os.path.isdir(root):
            return _fail(f"slide folder {root} does not exist or is not a folder")
    if not settings.slides.roots:
        log.warning("no slide folders configured; pass SLIDE_DIR or set slides.roots")
    host, port = settings.server.host, settings.server.port
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.set_inheritable(True)
    except OSError as error:
        return _fail(
            f"cannot listen on {host}:{port}: {error.strerror}; "
            "choose another --port or stop the process using it"
        )
    workers = settings.server.workers
    from tiled import metrics

    # A set PROMETHEUS_MULTIPROC_DIR means multiprocess mode even for one
    # worker; setup_multiprocess also clears files left by an earlier run.
    multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if workers == 1:
        if multiprocess_dir:
            metrics.setup_multiprocess(multiprocess_dir)
        return _run_worker(settings, sock)
    metrics.setup_multiprocess(
        multiprocess_dir or tempfile.mkdtemp(prefix="tiled-metrics-")
    )
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_worker(settings, sock)
            finally:
                os._exit(code)
        children.append(pid)
    log.info("started %d workers on %s:%d", workers, host, port)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, child_status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        metrics.mark_worker_dead(child)
        if os.waitstatus_to_exitcode(child_status) not in (0, -signal.SIGTERM):
            status = 1
    return status


def _run_worker(settings: Settings, sock: socket.socket) -> int:
    import asyncio

    import uvloop
    from aiohttp import web

    from tiled.errors import TiledError
    from tiled.server import create_app

    async def main() -> None:
        app = create_app(settings)
        runner = web.AppRunner(
            app,
            access_log=log if settings.server.access_log else None,
            handle_signals=True,
        )
        await runner.setup()
        loop = asyncio.get_running_loop()
        fast = None
        if settings.server.fast_path and not settings.server.access_log:
            from tiled.fastpath import FastPath

            fast = FastPath(app, runner.server)
            server = await loop.create_server(fast.protocol, sock=sock)
        else:
            site = web.SockSite(runner, sock)
            await site.start()
        host, port = sock.getsockname()[:2]
        log.info("tiled %s listening on http://%s:%d/", __version__, host, port)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting down")
        if fast is not None:
            server.close()
            fast.close()
        await runner.cleanup()

    try:
        uvloop.run(main())
    except TiledError as error:
        return _fail(str(error))
    return 0


def command_serve(args: argparse.Namespace) -> int:
    return _serve(_settings(args))


def command_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tiled.errors import TiledError
    from tiled.ingest import count_tiles, entry_for, ingest_slide
    from tiled.slides import ReaderCache, SlidePyramid, default_store_path, walk_slides
    from tiled.store import Store

    settings = _settings(args)
    roots = list(args.root or []) + settings.slides.roots
    paths: list[tuple[str, list[str]]] = []
    for path in args.slides:
        if os.path.isdir(path):
            # The daemon's scan, so DICOM series and files without a suffix
            # are found the same way.
            folder = os.path.realpath(path)
            # A configured root that contains the folder decides the ids, as
            # it does for the daemon; the folder itself only when none does.
            for relative in walk_slides(folder):
                paths.append((os.path.join(folder, relative), roots + [folder]))
        elif os.path.isfile(path):
            paths.append((path, roots))
        else:
            return _fail(f"{path}: no such file or folder")
    store = Store(
        settings.store.path or default_store_path(),
        settings.store.map_size_bytes,
        settings.store.max_map_size_bytes,
    )
    failures = 0
    for path, slide_roots in paths:
        entry = entry_for(path, slide_roots, settings.slides.id_secret)
        try:
            readers = ReaderCache(1)
            total = count_tiles(
                SlidePyramid(
                    entry, readers.get(entry), store, settings, readers, ingest=True
                )
            )
            readers.close()
            with tqdm(
                total=total,
                unit="tile",
                desc=entry.name,
                leave=True,
                disable=args.quiet,
                file=sys.stderr,
            ) as bar:
                result = ingest_slide(entry, store, settings, bar.update)
        except TiledError as error:
            failures += 1
            print(f"tiled: {path}: cannot ingest: {error}", file=sys.stderr)
            continue
        print(json.dumps({"id": entry.id, "path": path, **result}))
    store.close()
    if args.textfile:
        from tiled import metrics

        metrics.write_ingest_textfile(args.textfile)
    return 1 if failures else 0


def command_info(args: argparse.Namespace) -> int:
    from tiled.errors import TiledError
    from tiled.ingest import entry_for
    from tiled.readers import open_slide

    if not os.path.isfile(args.slide):
        return _fail(f"{args.slide}: no such file")
    try:
        reader = open_slide(args.slide)
    except TiledError as error:
        return _fail(f"{args.slide}: {error}", 1)
    with reader:
        entry = entry_for(args.slide, [])
        info = {
            "id": entry.id,
            "format": reader.format,
            "dimensions": list(reader.dimensions),
            "mpp": list(reader.mpp) if reader.mpp else None,
            "samples_per_pixel": reader.samples,
            "bits_per_sample": reader.bits,
            "stored_codec": reader.passthrough_codec or "lossless",
            "levels": [
                {
                    "width": level.width,
                    "height": level.height,
                    "tile_width": level.tile_width,
                    "tile_height": level.tile_height,
                    "downsample": round(level.downsample, 4),
                }
                for level in reader.levels
            ],
            "associated_images": {
                name: {
                    "width": size[0],
                    "height": size[1],
                    "served": name == "thumbnail",
                }
                for name, size in reader.associated_images.items()
            },
            "properties": dict(reader.properties),
            "withheld_properties": sorted(reader.withheld_properties),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"format      {info['format']}")
    print(f"dimensions  {info['dimensions'][0]} x {info['dimensions'][1]}")
    mpp = info["mpp"]
    print(f"mpp         {f'{mpp[0]:.4f} x {mpp[1]:.4f}' if mpp else 'not stated'}")
    print(
        f"pixels      {reader.samples} samples x {reader.bits} bits, "
        f"stored {info['stored_codec']}"
    )
    print("levels")
    for index, level in enumerate(info["levels"]):
        print(
            f"  {index}  {level['width']} x {level['height']}  tiles "
            f"{level['tile_width']}x{level['tile_height']}  "
            f"downsample {level['downsample']}"
        )
    for name, image in info["associated_images"].items():
        state = "served" if image["served"] else "withheld (may show patient data)"
        print(f"{name:<11} {image['width']} x {image['height']}, {state}")
    for key, value in info["properties"].items():
        print(f"  {key} = {value}")
    for key in info["withheld_properties"]:
        print(f"  {key} = [withheld]")
    return 0


def demo_slide_path() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "tiled", "demo", "demo-tissue.svs")


def command_demo(args: argparse.Namespace) -> int:
    from tiled.synthetic import write_slide

    path = demo_slide_path()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        width, height = DEMO_SIZE
        print(
            f"tiled: making a {width}x{height} synthetic demo slide at {path}",
            file=sys.stderr,
        )
        partial = path + ".part"
        write_slide(partial, width, height, aperio=True)
        os.replace(partial, path)
    args.slide_dirs = [os.path.dirname(path)]
    overrides = _overrides(args)
    # The demo slide is synthetic, so its file name is safe to show.
    overrides.setdefault("slides", {})["show_file_names"] = True
    settings = load_settings(args.config, overrides=overrides)
    print(
        f"tiled: open http://{settings.server.host}:{settings.server.port}/ "
        "in a browser",
        file=sys.stderr,
    )
    return _serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiled", description="Whole-slide image tile cache and server."
    )
    parser.add_argument("--version", action="version", version=f"tiled {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="YAML configuration file (default: $TILED_CONFIG)",
        )
        sub.add_argument(
            "--store",
            metavar="DIR",
            help="LMDB store folder (default ~/.cache/tiled/store)",
        )
        sub.add_argument(
            "--tile-size",
            type=int,
            metavar="PX",
            help="DeepZoom tile edge in pixels; 0 means native",
        )
        sub.add_argument(
            "--overlap", type=int, metavar="PX", help="DeepZoom tile overlap in pixels"
        )
        sub.add_argument(
            "--quality",
            type=int,
            metavar="Q",
            help="JPEG quality of tiles tiled encodes (1-100)",
        )

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="TCP port (default 8000)")
        sub.add_argument(
            "--workers", type=int, help="worker processes sharing the port (default 1)"
        )

    serve = commands.add_parser("serve", help="serve slides over HTTP")
    serve.add_argument(
        "slide_dirs",
        nargs="*",
        metavar="SLIDE_DIR",
        help="folders of slides (added to slides.roots)",
    )
    common(serve)
    server_options(serve)
    serve.set_defaults(handler=command_serve)

    ingest = commands.add_parser("ingest", help="fill the store with whole pyramids")
    ingest.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide files or folders of slides"
    )
    ingest.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="slide root the daemon serves, so ids match",
    )
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.add_argument(
        "--textfile",
        metavar="FILE.prom",
        help="write ingest counters here for node_exporter's textfile collector",
    )
    common(ingest)
    ingest.set_defaults(handler=command_ingest)

    info = commands.add_parser("info", help="show what a slide file contains")
    info.add_argument("slide", metavar="SLIDE")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=command_info)

    demo = commands.add_parser("demo", help="make a synthetic slide and serve it")
    common(demo)
    server_options(demo)
    demo.set_defaults(handler=command_demo, slide_dirs=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        # The readers' libraries warn about every oddity of every file they
        # parse; tiled logs what matters (a slide that cannot be opened).
        for library in ("tifffile", "pydicom", "wsidicom", "PIL"):
            logging.getLogger(library).setLevel(logging.ERROR)
    if getattr(args, "config", None) is None:
        args.config = None
    try:
        return args.handler(args)
    except ConfigError as error:
        return _fail(f"invalid configuration: {error}")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into a command that stopped reading (head, less).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
