"""Minimal Python tile servers on uvloop that serve JPEG tiles from LMDB.

They show the ceiling of tiled's own stack on the benchmark machine. The
`load` command copies a vips dzsave tree into an LMDB environment (key
``{level}/{col}_{row}``, value the JPEG bytes); `serve` serves
``GET /{level}/{col}_{row}.jpg`` from it with one read-only transaction per
request and no other work: no metrics, no middleware, no access log. Its
``--mode`` picks how much HTTP machinery sits in front of that: an aiohttp
web.Application, aiohttp's low-level web.Server, or a bare asyncio.Protocol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lmdb


def load_tree(tree: Path, store: Path) -> int:
    """Copy every tile of a dzsave tree (the *_files folder) into store."""
    tiles = sorted(tree.glob("*/*.jpg"))
    if not tiles:
        raise SystemExit(f"no tiles under {tree}; expected LEVEL/COL_ROW.jpg files")
    total_bytes = sum(path.stat().st_size for path in tiles)
    store.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(store), map_size=max(2 * total_bytes, 1 << 28))
    with env.begin(write=True) as txn:
        for path in tiles:
            key = f"{path.parent.name}/{path.stem}".encode()
            txn.put(key, path.read_bytes())
    env.close()
    return len(tiles)


def serve(store: Path, host: str, port: int) -> None:
    """Serve with an aiohttp web.Application, as a typical aiohttp app does."""
    import uvloop
    from aiohttp import web

    env = lmdb.open(str(store), readonly=True, lock=False, readahead=False)

    async def tile(request: web.Request) -> web.Response:
        key = f"{request.match_info['level']}/{request.match_info['tile']}".encode()
        with env.begin() as txn:
            data = txn.get(key)
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/{level}/{tile}.jpg", tile)
    uvloop.install()
    web.run_app(app, host=host, port=port, access_log=None, print=None)


def serve_low_level(store: Path, host: str, port: int) -> None:
    """Serve with aiohttp's low-level web.Server: its HTTP parser and response
    writer, but no router, no middleware chain and no Application."""
    import asyncio

    import uvloop
    from aiohttp import web

    env = lmdb.open(str(store), readonly=True, lock=False, readahead=False)

    async def handle(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path == "/health":
            return web.Response(text="ok")
        data = None
        if path.endswith(".jpg"):
            with env.begin() as txn:
                data = txn.get(path[1:-4].encode())
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/jpeg")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = web.Server(handle, access_log=None)
        listener = await loop.create_server(server, host, port, backlog=1024)
        async with listener:
            await listener.serve_forever()

    uvloop.run(run())


class TileProtocol:
    """An HTTP/1.1 keep-alive server written straight on asyncio.Protocol.

    It parses only what wrk and browsers send for a GET: a request line and
    headers ended by a blank line, with no body. Anything else gets a 404. So
    it measures what the event loop and LMDB cost without an HTTP framework.
    """

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            self.buffer = self.buffer[end + 4 :]
            line = head.split(b"\r\n", 1)[0]
            parts = line.split(b" ")
            body = None
            if len(parts) == 3 and parts[0] == b"GET":
                path = parts[1]
                if path == b"/health":
                    body = b"ok"
                elif path.endswith(b".jpg"):
                    with self.env.begin() as txn:
                        body = txn.get(path[1:-4])
            if body is None:
                self.transport.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                )
                continue
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )

    def eof_received(self) -> None:
        return None


def serve_protocol(store: Path, host: str, port: int) -> None:
    """Serve with TileProtocol on uvloop."""
    import asyncio

    import uvloop

    env = lmdb.open(str(store), readonly=True, lock=False, readahead=False)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: TileProtocol(env), host, port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    uvloop.run(run())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    load_parser = commands.add_parser("load", help="copy a dzsave tree into LMDB")
    load_parser.add_argument("tree", type=Path, help="the slide_files folder")
    load_parser.add_argument("store", type=Path, help="LMDB environment folder")
    serve_parser = commands.add_parser("serve", help="serve tiles from LMDB")
    serve_parser.add_argument("store", type=Path)
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8001)
    serve_parser.add_argument(
        "--mode",
        choices=("app", "low-level", "protocol"),
        default="app",
        help="app: aiohttp web.Application (default); low-level: aiohttp "
        "web.Server; protocol: TileProtocol, no HTTP framework",
    )
    args = parser.parse_args(argv)
    if args.command == "load":
        count = load_tree(args.tree, args.store)
        print(f"loaded {count} tiles into {args.store}")
    elif args.mode == "protocol":
        serve_protocol(args.store, args.host, args.port)
    elif args.mode == "low-level":
        serve_low_level(args.store, args.host, args.port)
    else:
        serve(args.store, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
