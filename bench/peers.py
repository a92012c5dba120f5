"""The servers under test: nginx, IIPImage under lighttpd, memcached and tiled.

Every server runs in its own process group, pinned with taskset to the server
CPU, and writes its configuration and logs under one run folder.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from load import Tile

log = logging.getLogger("bench.peers")

IIPSRV_FCGI = Path("/usr/lib/iipimage-server/iipsrv.fcgi")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A child process in its own session, so stopping it reaches its children."""

    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        cpu: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = ["taskset", "-c", cpu, *command]
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        log.info("start %s: %s", self.name, " ".join(self.command))
        log_file = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=None if self.env is None else dict(os.environ, **self.env),
        )
        log_file.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"log {self.log_path}:\n{tail}"
            )

    def stop(self) -> None:
        """Send SIGTERM to the process group this object started, then SIGKILL."""
        if self.popen is None or self.popen.poll() is not None:
            return
        group = self.popen.pid
        os.killpg(group, signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop on SIGTERM, sending SIGKILL", self.name)
            os.killpg(group, signal.SIGKILL)
            self.popen.wait(timeout=10)
        # Children such as iipsrv may outlive the group leader by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def wait_for_http(
    port: int, path: str, processes: list[Process], timeout_s: float = 60.0
) -> bytes:
    """Poll GET path until it returns 200 and return the body."""
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt"
    while time.monotonic() < deadline:
        for process in processes:
            process.check_alive()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            connection.close()
            if response.status == 200:
                return body
            last_error = f"HTTP {response.status}: {body[:200]!r}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.2)
    raise TimeoutError(
        f"GET 127.0.0.1:{port}{path} not ready after {timeout_s:.0f} s: {last_error}"
    )


class Peer:
    """A server under test: how to start it and how to spell a tile URL."""

    name = ""
    description = ""
    # The --peers key that selected this peer.
    option_key = ""

    def __init__(self, run_dir: Path, cpu: str) -> None:
        self.run_dir = run_dir / self.key
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.port = free_port()
        self.processes: list[Process] = []

    @property
    def key(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def start(self) -> None:
        raise NotImplementedError

    def tile_path(self, tile: Tile) -> str:
        raise NotImplementedError

    def server_pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


class NginxPeer(Peer):
    name = "nginx static"
    description = (
        "nginx, one worker, sendfile, open_file_cache, serving a "
        "vips dzsave tree (256 px, overlap 0, Q80)"
    )

    def __init__(self, run_dir: Path, cpu: str, dz_dir: Path) -> None:
        super().__init__(run_dir, cpu)
        self.dz_dir = dz_dir.resolve()

    def start(self) -> None:
        temp = self.run_dir / "temp"
        temp.mkdir(exist_ok=True)
        user_line = "user root;" if os.geteuid() == 0 else ""
        config = self.run_dir / "nginx.conf"
        config.write_text(f"""\
{user_line}
worker_processes 1;
daemon off;
pid {self.run_dir}/nginx.pid;
error_log {self.run_dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    open_file_cache max=50000 inactive=300s;
    open_file_cache_valid 300s;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    types {{ image/jpeg jpg; application/xml dzi; }}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.dz_dir};
    }}
}}
""")
        process = Process(
            self.name,
            ["nginx", "-c", str(config), "-e", str(self.run_dir / "error.log")],
            self.run_dir / "stdout.log",
            self.cpu,
        )
        process.start()
        self.processes.append(process)
        wait_for_http(self.port, "/slide.dzi", self.processes)

    def tile_path(self, tile: Tile) -> str:
        return f"/slide_files/{tile.level}/{tile.col}_{tile.row}.jpg"


class MemcachedPeer:
    """memcached for IIPImage, pinned to the same CPU as the server."""

    def __init__(self, run_dir: Path, cpu: str, memory_mb: int = 1024) -> None:
        self.port = free_port()
        command = [
            "memcached",
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",
            "-t",
            "1",
            "-m",
            str(memory_mb),
        ]
        if os.geteuid() == 0:
            command += ["-u", "root"]
        self.process = Process("memcached", command, run_dir / "memcached.log", cpu)

    def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.process.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"memcached did not listen on port {self.port}")


class IipPeer(Peer):
    """IIPImage (iipsrv.fcgi) as one FastCGI process under lighttpd."""

    def __init__(self, run_dir: Path, cpu: str, slide: Path, memcached: bool) -> None:
        self.memcached = memcached
        self.name = "IIPImage + memcached" if memcached else "IIPImage"
        self.description = (
            "iipsrv.fcgi under lighttpd mod_fastcgi, one process, unix socket"
            + (
                ", tile responses cached in memcached"
                if memcached
                else ", no memcached (decodes and re-encodes every tile)"
            )
        )
        super().__init__(run_dir, cpu)
        self.slide = slide.resolve()

    def start(self) -> None:
        if not IIPSRV_FCGI.exists():
            raise FileNotFoundError(
                f"{IIPSRV_FCGI} is missing; install the Debian package iipimage-server"
            )
        environment = {
            "VERBOSITY": "0",
            "LOGFILE": str(self.run_dir / "iipsrv.log"),
            "JPEG_QUALITY": "80",
            "MAX_CVT": "5000",
        }
        if self.memcached:
            memcached = MemcachedPeer(self.run_dir, self.cpu)
            memcached.start()
            self.processes.append(memcached.process)
            environment["MEMCACHED_SERVERS"] = f"127.0.0.1:{memcached.port}"
        www = self.run_dir / "www"
        www.mkdir(exist_ok=True)
        bin_environment = ", ".join(
            f'"{key}" => "{value}"' for key, value in environment.items()
        )
        config = self.run_dir / "lighttpd.conf"
        config.write_text(f"""\
server.modules = ("mod_fastcgi")
server.document-root = "{www}"
server.bind = "127.0.0.1"
server.port = {self.port}
server.errorlog = "{self.run_dir}/lighttpd-error.log"
server.max-connections = 4096
server.max-keep-alive-requests = 1000000
server.max-keep-alive-idle = 300
fastcgi.server = (
    "/fcgi-bin/iipsrv.fcgi" => ((
        "socket" => "{self.run_dir}/iipsrv.sock",
        "bin-path" => "{IIPSRV_FCGI}",
        "max-procs" => 1,
        "check-local" => "disable",
        "bin-environment" => ({bin_environment})
    ))
)
""")
        process = Process(
            self.name,
            ["lighttpd", "-D", "-f", str(config)],
            self.run_dir / "lighttpd.log",
            self.cpu,
        )
        process.start()
        self.processes.append(process)
        wait_for_http(
            self.port,
            f"/fcgi-bin/iipsrv.fcgi?DeepZoom={self.slide}.dzi",
            self.processes,
        )

    def tile_path(self, tile: Tile) -> str:
        return (
            f"/fcgi-bin/iipsrv.fcgi?DeepZoom={self.slide}_files/"
            f"{tile.level}/{tile.col}_{tile.row}.jpg"
        )


class TiledPeer(Peer):
    name = "tiled"
    description = (
        "tiled serve, one worker, access log off, tiles ingested "
        "into the LMDB store beforehand"
    )

    def __init__(
        self,
        run_dir: Path,
        cpu: str,
        slide_dir: Path,
        store: Path,
        tiled_command: list[str],
    ) -> None:
        super().__init__(run_dir, cpu)
        self.slide_dir = slide_dir.resolve()
        self.store = store.resolve()
        self.tiled_command = tiled_command
        self.slide_id = ""

    def ingest(self, slide: Path) -> None:
        """Fill the store once; a marker file skips later runs."""
        marker = self.store / ".bench-ingested"
        stamp = f"{slide.resolve()} {slide.stat().st_size} {slide.stat().st_mtime_ns}"
        if marker.exists() and marker.read_text() == stamp:
            log.info("tiled store %s is already filled", self.store)
            return
        shutil.rmtree(self.store, ignore_errors=True)
        self.store.parent.mkdir(parents=True, exist_ok=True)
        command = [
            *self.tiled_command,
            "ingest",
            str(slide.resolve()),
            "--root",
            str(self.slide_dir),
            "--store",
            str(self.store),
            "--quiet",
        ]
        log.info("run %s", " ".join(command))
        started = time.monotonic()
        subprocess.run(command, check=True)
        log.info("tiled ingest took %.1f s", time.monotonic() - started)
        marker.write_text(stamp)

    def start(self) -> None:
        config = self.run_dir / "tiled.yaml"
        config.write_text("server:\n  workers: 1\n  access_log: false\n")
        command = [
            *self.tiled_command,
            "serve",
            str(self.slide_dir),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--store",
            str(self.store),
        ]
        process = Process(self.name, command, self.run_dir / "tiled.log", self.cpu)
        process.start()
        self.processes.append(process)
        body = wait_for_http(self.port, "/slides", self.processes)
        slides = json.loads(body)
        if isinstance(slides, dict):
            slides = slides.get("slides", [])
        if not slides:
            raise RuntimeError(f"tiled lists no slides in {self.slide_dir}")
        self.slide_id = str(slides[0]["id"])
        wait_for_http(self.port, f"/slides/{self.slide_id}.dzi", self.processes)

    def tile_path(self, tile: Tile) -> str:
        return f"/slides/{self.slide_id}_files/{tile.level}/{tile.col}_{tile.row}.jpeg"


MINIMAL_MODES = {
    "app": (
        "minimal aiohttp + LMDB",
        "bench/minimal_server.py: aiohttp web.Application on uvloop, one LMDB "
        "get per request, no middleware",
    ),
    "low-level": (
        "minimal aiohttp low-level + LMDB",
        "bench/minimal_server.py --mode low-level: aiohttp web.Server on uvloop "
        "(no router, no Application), one LMDB get per request",
    ),
    "protocol": (
        "minimal uvloop protocol + LMDB",
        "bench/minimal_server.py --mode protocol: a bare asyncio.Protocol on "
        "uvloop, one LMDB get per request",
    ),
}


class MinimalPeer(Peer):
    """bench/minimal_server.py: uvloop + LMDB with little or no HTTP framework."""

    def __init__(
        self, run_dir: Path, cpu: str, dz_dir: Path, store: Path, mode: str = "app"
    ) -> None:
        self.mode = mode
        self.name, self.description = MINIMAL_MODES[mode]
        super().__init__(run_dir, cpu)
        self.tree = dz_dir.resolve() / "slide_files"
        self.store = store.resolve()
        self.script = Path(__file__).with_name("minimal_server.py")

    def start(self) -> None:
        marker = self.store / ".bench-loaded"
        if not marker.exists():
            shutil.rmtree(self.store, ignore_errors=True)
            subprocess.run(
                [
                    sys.executable,
                    str(self.script),
                    "load",
                    str(self.tree),
                    str(self.store),
                ],
                check=True,
            )
            marker.write_text(str(self.tree) + "\n")
        command = [
            sys.executable,
            str(self.script),
            "serve",
            str(self.store),
            "--port",
            str(self.port),
            "--mode",
            self.mode,
        ]
        process = Process(self.name, command, self.run_dir / "server.log", self.cpu)
        process.start()
        self.processes.append(process)
        wait_for_http(self.port, "/health", self.processes)

    def tile_path(self, tile: Tile) -> str:
        return f"/{tile.level}/{tile.col}_{tile.row}.jpg"
