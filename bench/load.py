"""Tile lists, the warm-up pass and wrk runs."""

from __future__ import annotations

import http.client
import logging
import math
import os
import random
import re
import resource
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.load")

LUA_SCRIPT = Path(__file__).with_name("cycle.lua")


@dataclass(frozen=True)
class Tile:
    level: int
    col: int
    row: int


def deepzoom_levels(
    width: int, height: int, tile_size: int
) -> list[tuple[int, int, int]]:
    """Return (level, columns, rows) for every DeepZoom level, highest first.

    The DeepZoom format halves the image per level, rounding up, down to 1x1 at
    level 0, so the full-resolution level is ceil(log2(max(width, height))).
    """
    max_level = math.ceil(math.log2(max(width, height)))
    levels = []
    for level in range(max_level, -1, -1):
        scale = 2 ** (max_level - level)
        level_width = math.ceil(width / scale)
        level_height = math.ceil(height / scale)
        levels.append(
            (
                level,
                math.ceil(level_width / tile_size),
                math.ceil(level_height / tile_size),
            )
        )
    return levels


def sample_tiles(
    width: int,
    height: int,
    count: int,
    top_levels: int,
    seed: int,
    tile_size: int = 256,
) -> list[Tile]:
    """Pick count distinct tiles, uniformly over the top_levels highest levels."""
    population = []
    for level, columns, rows in deepzoom_levels(width, height, tile_size)[:top_levels]:
        for row in range(rows):
            for col in range(columns):
                population.append(Tile(level, col, row))
    if count > len(population):
        raise ValueError(
            f"asked for {count} tiles but the top {top_levels} levels have "
            f"{len(population)}; raise --levels or lower --tiles"
        )
    return random.Random(seed).sample(population, count)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Return (width, height) from a JPEG's start-of-frame marker, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:
            offset += 1
            continue
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        # SOF0-SOF15 carry the frame size, except DHT (C4), JPG (C8), DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            return width, height
        offset += 2 + length
    return None


@dataclass
class WarmupResult:
    requests: int
    errors: list[str]
    bytes_total: int
    sizes: dict[str, tuple[int, int] | None]


def warm_up(port: int, paths: list[str], tiles: list[Tile]) -> WarmupResult:
    """GET every path once on one keep-alive connection and check the JPEGs.

    Filling caches is the point (memcached, the page cache, tiled's store).
    The decoded frame sizes let the caller check that every peer returns the
    same pixels box for the same tile.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    errors: list[str] = []
    sizes: dict[str, tuple[int, int] | None] = {}
    bytes_total = 0
    for path, tile in zip(paths, tiles, strict=True):
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        bytes_total += len(body)
        key = f"{tile.level}/{tile.col}_{tile.row}"
        content_type = response.getheader("Content-Type", "")
        if response.status != 200:
            errors.append(f"{path}: HTTP {response.status}")
            sizes[key] = None
            continue
        if not content_type.startswith("image/jpeg"):
            errors.append(f"{path}: Content-Type {content_type!r}, expected image/jpeg")
        sizes[key] = jpeg_size(body)
        if sizes[key] is None:
            errors.append(f"{path}: body is not a JPEG ({len(body)} bytes)")
    connection.close()
    return WarmupResult(len(paths), errors, bytes_total, sizes)


UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"invalid wrk duration {text!r}")
    return float(match.group(1)) * UNIT_SECONDS[match.group(2)] * 1000.0


def parse_wrk(output: str) -> dict:
    """Extract throughput, latency percentiles and errors from wrk --latency."""
    result: dict = {}
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise ValueError(f"wrk output has no Requests/sec line:\n{output}")
    result["requests_per_second"] = float(match.group(1))
    match = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", output)
    if match:
        result["requests"] = int(match.group(1))
        result["duration_ms"] = parse_duration_ms(match.group(2))
        result["read"] = match.group(3)
    for percentile in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{percentile}%\s+([\d.]+\w+)", output, re.MULTILINE)
        if match:
            result[f"p{percentile}_ms"] = parse_duration_ms(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    result["socket_errors"] = (
        sum(int(group) for group in match.groups()) if match else 0
    )
    return result


def process_group_cpu_seconds(group: int) -> float:
    """Sum user and system CPU time of the live processes in a process group."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    total_ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in brackets and may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == group:
            total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / ticks_per_second


def task_run_delays(pid: int) -> float:
    """Sum the run delay of every thread of a process, in seconds.

    The run delay, the second field of /proc/PID/task/TID/schedstat, is the
    time a thread was runnable but waiting for a CPU. Returns 0.0 for a
    process that is gone.
    """
    total_ns = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total_ns += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total_ns / 1e9


def process_group_run_delay(group: int) -> float:
    """Sum the run delay of every live process in a process group, in seconds."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == group:
            total += task_run_delays(int(entry.name))
    return total


def cpu_busy_seconds() -> dict[str, float]:
    """Return the seconds each CPU spent running processes, from /proc/stat.

    That is user, nice, system and steal time. Interrupt and softirq time is
    left out because much of it is the loopback traffic of the benchmark itself.
    Steal time counts because the guest could not run then either.
    """
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
            int(value) for value in values[:8]
        )
        busy[name[3:]] = (user + nice + system + steal) / ticks_per_second
    return busy


def run_wrk(
    port: int,
    urls_file: Path,
    duration_s: float,
    connections: int,
    threads: int,
    client_cpu: str,
    server_groups: tuple[int, ...] | list[int] = (),
) -> tuple[dict, str]:
    """Run one bounded wrk load on 127.0.0.1:port; return parsed and raw output.

    Besides wrk's figures, the result contains the CPU use of wrk, of the
    server process groups given and of each CPU as a whole, in percent of one
    core over the run. It also contains how long wrk and the servers were
    runnable but waited for their CPU (the scheduler's run delay), in percent
    of the run.
    """
    command = [
        "taskset",
        "-c",
        client_cpu,
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        f"http://127.0.0.1:{port}",
    ]
    environment = dict(os.environ, BENCH_URLS=str(urls_file))
    log.debug("run %s", " ".join(command))
    server_before = sum(process_group_cpu_seconds(group) for group in server_groups)
    server_wait_before = sum(process_group_run_delay(group) for group in server_groups)
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = cpu_busy_seconds()
    started = time.monotonic()
    wrk = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wrk's run delay is read inside its run, because an exited process has
    # no /proc entry. taskset execs wrk, so the pid is wrk's.
    window = max(duration_s - 0.6, 0.1)
    time.sleep(0.3)
    client_wait_before = task_run_delays(wrk.pid)
    window_started = time.monotonic()
    time.sleep(window)
    client_wait = task_run_delays(wrk.pid) - client_wait_before
    client_window = time.monotonic() - window_started
    try:
        stdout, stderr = wrk.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        wrk.kill()
        wrk.communicate()
        raise
    if wrk.returncode != 0:
        raise subprocess.CalledProcessError(wrk.returncode, command, stdout, stderr)
    server_wait = (
        sum(process_group_run_delay(group) for group in server_groups)
        - server_wait_before
    )
    elapsed = time.monotonic() - started
    busy_after = cpu_busy_seconds()
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_after = sum(process_group_cpu_seconds(group) for group in server_groups)
    parsed = parse_wrk(stdout)
    client_seconds = (
        client_after.ru_utime
        + client_after.ru_stime
        - client_before.ru_utime
        - client_before.ru_stime
    )
    parsed["client_cpu_percent"] = 100.0 * client_seconds / elapsed
    if server_groups:
        server_seconds = server_after - server_before
        parsed["server_cpu_percent"] = 100.0 * server_seconds / elapsed
        # CPU time per request barely moves when other processes take turns on
        # the server's CPU, unlike req/s, so it compares peers on a busy machine.
        if parsed.get("requests"):
            parsed["server_cpu_us_per_request"] = (
                1e6 * server_seconds / parsed["requests"]
            )
    parsed["cpu_busy_percent"] = {
        cpu: 100.0 * (busy_after[cpu] - busy_before.get(cpu, 0.0)) / elapsed
        for cpu in busy_after
    }
    parsed["client_wait_percent"] = 100.0 * max(client_wait, 0.0) / client_window
    if server_groups:
        parsed["server_wait_percent"] = 100.0 * max(server_wait, 0.0) / elapsed
    return parsed, stdout
