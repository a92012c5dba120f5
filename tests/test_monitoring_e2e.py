"""End-to-end checks of the monitoring files against a real Prometheus.

The fixture starts tiled, HAProxy in front of it, node_exporter and Prometheus
(with monitoring/prometheus.yml and the shipped rules, at 1 s intervals) on
127.0.0.1, sends tile traffic through HAProxy, and waits for the rules to have
data. Then every recording rule and every dashboard query must be valid and
return at least one series. Each process is stopped by its PID at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def write_test_slide(path: Path, width: int = 2048, height: int = 1536) -> None:
    """Write a pyramidal JPEG TIFF: 256-pixel tiles, each level half the last."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1
    ).astype(np.uint8)
    levels = [image]
    while max(levels[-1].shape[:2]) > 256:
        levels.append(levels[-1][::2, ::2])
    options = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(levels[0], subifds=len(levels) - 1, **options)
        for level in levels[1:]:
            tiff.write(level, subfiletype=1, **options)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """Return the status and body of a GET, including error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Poll ``url`` until it returns 200, and fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            if http_get(url, timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not return 200 within {timeout} s")


class Processes:
    """Processes started by a test, stopped in reverse order by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=self.log_dir,
        )
        log.close()
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.started):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def start_tiled(
    processes: Processes,
    slide_dir: Path,
    store_dir: Path,
    port: int,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    args = [sys.executable, "-m", "tiled", "serve", str(slide_dir)]
    args += ["--host", HOST, "--port", str(port), "--store", str(store_dir)]
    args += ["--workers", str(workers)]
    process = processes.start("tiled", args, env)
    wait_for_http(f"http://{HOST}:{port}/healthz", process)
    return process


def start_node_exporter(
    processes: Processes, port: int, textfile_dir: Path
) -> subprocess.Popen:
    # Only the collectors the rules read, so a scrape stays cheap.
    args = [
        shutil.which("prometheus-node-exporter") or "node_exporter",
        f"--web.listen-address={HOST}:{port}",
        "--collector.disable-defaults",
        "--collector.cpu",
        "--collector.meminfo",
        "--collector.filesystem",
        "--collector.netdev",
        "--collector.textfile",
        f"--collector.textfile.directory={textfile_dir}",
    ]
    process = processes.start("node_exporter", args)
    wait_for_http(f"http://{HOST}:{port}/metrics", process)
    return process


HAPROXY_CONFIG = """\
global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend tiles
    bind {host}:{frontend_port}
    default_backend tiled

frontend stats
    bind {host}:{stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}

backend tiled
    option httpchk GET /healthz
    server tiled1 {host}:{tiled_port} check inter 1s
"""


def start_haproxy(
    processes: Processes, frontend_port: int, stats_port: int, tiled_port: int
) -> subprocess.Popen:
    config = processes.log_dir / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(
            host=HOST,
            frontend_port=frontend_port,
            stats_port=stats_port,
            tiled_port=tiled_port,
        )
    )
    process = processes.start(
        "haproxy", [shutil.which("haproxy"), "-db", "-f", str(config)]
    )
    wait_for_http(f"http://{HOST}:{stats_port}/metrics", process)
    return process


def prometheus_test_config(
    work_dir: Path, port: int, targets: dict[str, Iterable[str]]
) -> Path:
    """Write a copy of monitoring/prometheus.yml for a test and return its path.

    The jobs and rule files stay as shipped. Intervals drop to 1 s, paths become
    absolute, and each file_sd job reads the targets given for it.
    """
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s"
    )
    config["rule_files"] = [str(MONITORING / path) for path in config["rule_files"]]
    target_dir = work_dir / "targets"
    target_dir.mkdir(exist_ok=True)
    for alertmanager in config["alerting"]["alertmanagers"]:
        for sd in alertmanager["file_sd_configs"]:
            sd["files"] = [str(MONITORING / path) for path in sd["files"]]
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name == "prometheus":
            job["static_configs"] = [{"targets": [f"{HOST}:{port}"]}]
            continue
        target_file = target_dir / f"{name}.yml"
        target_file.write_text(yaml.safe_dump([{"targets": list(targets[name])}]))
        job["file_sd_configs"] = [{"files": [str(target_file)]}]
    path = work_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(
    processes: Processes, config: Path, port: int, data_dir: Path
) -> subprocess.Popen:
    args = [
        shutil.which("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={HOST}:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    process = processes.start("prometheus", args)
    wait_for_http(f"http://{HOST}:{port}/-/ready", process)
    return process


def prometheus_query(port: int, query: str) -> dict[str, Any]:
    """Run an instant query and return the decoded API response, errors included."""
    url = f"http://{HOST}:{port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": query}
    )
    _, body = http_get(url)
    return json.loads(body)


def prometheus_api(port: int, path: str) -> dict[str, Any]:
    _, body = http_get(f"http://{HOST}:{port}{path}")
    return json.loads(body)


def grafana_multi_value(values: list[str]) -> str:
    """Format a multi-value variable as Grafana does for a Prometheus query.

    Grafana joins the values into a regex alternation and escapes regex
    characters with two backslashes, one of which the PromQL string removes.
    """
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute_variables(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} with already formatted values."""
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value)
        expr = re.sub(rf"\${name}\b", lambda _, value=value: value, expr)
    return expr


# Traffic


def tile_urls(base: str, slide: dict[str, Any], tile_size: int = 256) -> list[str]:
    """Return the URL of every DeepZoom tile of a slide, coarsest level first."""
    width, height = slide["width"], slide["height"]
    max_level = math.ceil(math.log2(max(width, height)))
    prefix = f"{base}/slides/{slide['id']}_files"
    urls = []
    for level in range(max_level + 1):
        scale = 2 ** (max_level - level)
        columns = math.ceil(math.ceil(width / scale) / tile_size)
        rows = math.ceil(math.ceil(height / scale) / tile_size)
        for column in range(columns):
            for row in range(rows):
                urls.append(f"{prefix}/{level}/{column}_{row}.jpeg")
    return urls


def missing_tile_urls(base: str, slide: dict[str, Any], count: int) -> list[str]:
    """Return URLs that must return 404: tiles past the edge, an unknown slide."""
    max_level = math.ceil(math.log2(max(slide["width"], slide["height"])))
    prefix = f"{base}/slides/{slide['id']}_files/{max_level}"
    urls = [f"{prefix}/{100 + index}_0.jpeg" for index in range(count // 2)]
    urls += [
        f"{base}/slides/nosuchslide{index}_files/0/0_0.jpeg"
        for index in range(count - len(urls))
    ]
    return urls


def fetch_all(urls: list[str]) -> Counter[int]:
    """GET every URL with four clients at once and count the statuses."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(lambda url: http_get(url)[0], urls))
    return Counter(statuses)


# What `tiled ingest` would report after two slides of 60 tiles.
INGEST_SCRIPT = """
import sys
from tiled import metrics
metrics.INGEST_TILES.inc(120)
metrics.INGEST_SLIDES.labels("complete").inc(2)
metrics.write_ingest_textfile(sys.argv[1])
"""


def write_ingest_counts(path: Path) -> None:
    """Write ingest counters from a separate process, as the ingest command runs."""
    subprocess.run(
        [sys.executable, "-c", INGEST_SCRIPT, str(path)], check=True, timeout=60
    )


# Queries under test


def recording_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((MONITORING / "rules" / "recording.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """Return (id, expression) of every panel query of every dashboard."""
    targets = []
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                name = f"{dashboard['uid']}/{panel['title']}/{target['refId']}"
                targets.append((name, target["expr"]))
    return targets


def dashboard_variable_queries() -> list[tuple[str, str]]:
    """Return (id, PromQL) for each label_values() variable of the dashboards."""
    queries = []
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(
                r"label_values\((.*), *(\w+)\)", variable["query"]["query"]
            )
            assert match, variable["query"]
            selector, label = match.groups()
            name = f"{dashboard['uid']}/${variable['name']}"
            queries.append((name, f"group by ({label}) ({selector})"))
    return queries


def has_network_interface() -> bool:
    """Return True if the host has an interface besides loopback."""
    return any(name != "lo" for name in os.listdir("/sys/class/net"))


# Fixture

BINARIES = ("prometheus", "haproxy", "prometheus-node-exporter")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(
            f"not installed: {', '.join(missing)} (Debian packages "
            "prometheus, haproxy, prometheus-node-exporter)"
        )
    work_dir = tmp_path_factory.mktemp("monitoring-e2e")
    slide_dir = work_dir / "slides"
    slide_dir.mkdir()
    write_test_slide(slide_dir / "gradient.tiff")
    ports = {name: free_port() for name in ("tiled", "front", "stats", "node", "prom")}
    processes = Processes(work_dir)
    try:
        start_tiled(processes, slide_dir, work_dir / "store", ports["tiled"])
        start_haproxy(processes, ports["front"], ports["stats"], ports["tiled"])
        textfile_dir = work_dir / "textfile"
        textfile_dir.mkdir()
        write_ingest_counts(textfile_dir / "tiled_ingest.prom")
        start_node_exporter(processes, ports["node"], textfile_dir)
        config = prometheus_test_config(
            work_dir,
            ports["prom"],
            {
                "tiled": [f"{HOST}:{ports['tiled']}"],
                "node": [f"{HOST}:{ports['node']}"],
                "haproxy": [f"{HOST}:{ports['stats']}"],
            },
        )
        start_prometheus(processes, config, ports["prom"], work_dir / "data")

        base = f"http://{HOST}:{ports['front']}"
        slide = json.loads(http_get(f"{base}/slides")[1])["slides"][0]
        assert http_get(base + slide["dzi"])[0] == 200
        tiles = tile_urls(base, slide)
        missing_tiles = missing_tile_urls(base, slide, 40)
        statuses: Counter[int] = Counter()
        # Three passes a few scrapes apart: the first generates every tile, the
        # others hit the cache, and rates need increases between scrapes.
        for _ in range(3):
            statuses += fetch_all(tiles)
            statuses += fetch_all(missing_tiles)
            time.sleep(2)
        yield {
            "ports": ports,
            "processes": processes,
            "statuses": statuses,
            "tiles": len(tiles),
            "variables": {
                "job": "tiled",
                "instance": grafana_multi_value([f"{HOST}:{ports['tiled']}"]),
                "host": HOST,
            },
        }
    finally:
        processes.stop_all()


def wait_for_data(port: int, expr: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll an instant query until it returns a series or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        response = prometheus_query(port, expr)
        if response.get("status") != "success":
            return response
        if response["data"]["result"] or time.monotonic() > deadline:
            return response
        time.sleep(1)


def assert_query_has_data(stack: dict[str, Any], name: str, expr: str) -> None:
    if "node_network" in expr and not has_network_interface():
        pytest.skip("the host has no network interface but loopback")
    query = substitute_variables(expr, stack["variables"])
    response = wait_for_data(stack["ports"]["prom"], query)
    assert response.get("status") == "success", (
        f"{name}: {response.get('error')}\n{query}"
    )
    assert response["data"]["result"], f"{name}: no data\n{query}"


# Tests


def test_traffic_statuses(stack):
    # Three passes over every tile and 40 missing ones.
    assert stack["statuses"][200] == 3 * stack["tiles"]
    assert stack["statuses"][404] == 3 * 40
    assert set(stack["statuses"]) == {200, 404}


@pytest.mark.parametrize("job", ["tiled", "node", "haproxy", "prometheus"])
def test_scrape_target_up(stack, job):
    response = wait_for_data(stack["ports"]["prom"], f'up{{job="{job}"}} == 1')
    assert response["data"]["result"], f"job {job} is not up"


def test_rules_evaluate_without_errors(stack):
    time.sleep(2)
    groups = prometheus_api(stack["ports"]["prom"], "/api/v1/rules")["data"]["groups"]
    names = {group["name"] for group in groups}
    assert "tiled_http" in names
    assert "tiled_alerts" in names
    for group in groups:
        for rule in group["rules"]:
            label = rule["name"]
            assert rule["health"] == "ok", f"{label}: {rule.get('lastError')}"


@pytest.mark.parametrize("rule", recording_rules(), ids=lambda rule: rule["record"])
def test_recording_rule_returns_data(stack, rule):
    assert_query_has_data(stack, rule["record"], rule["expr"])
    # The recorded series exists too, so the rule was evaluated.
    assert_query_has_data(stack, rule["record"], rule["record"])


@pytest.mark.parametrize(
    "name, expr", dashboard_targets(), ids=[name for name, _ in dashboard_targets()]
)
def test_dashboard_query_returns_data(stack, name, expr):
    assert_query_has_data(stack, name, expr)


@pytest.mark.parametrize(
    "name, query",
    dashboard_variable_queries(),
    ids=[name for name, _ in dashboard_variable_queries()],
)
def test_dashboard_variable_returns_values(stack, name, query):
    assert_query_has_data(stack, name, query)


def test_request_counts_reach_prometheus(stack):
    # Every tile request passed HAProxy to tiled, and the scraped counters agree.
    port = stack["ports"]["prom"]
    expected = {"2xx": 3 * stack["tiles"] + 1, "4xx": 3 * 40}
    for status_class, count in expected.items():
        query = (
            'sum(tiled_http_requests_total{job="tiled", route="deepzoom", '
            f'status_class="{status_class}"}})'
        )
        deadline = time.monotonic() + 30
        value = None
        while time.monotonic() < deadline:
            result = prometheus_query(port, query)["data"]["result"]
            value = float(result[0]["value"][1]) if result else None
            if value == count:
                break
            time.sleep(1)
        assert value == count, f"{status_class}: {value} != {count}"


def test_ingest_counts_reach_prometheus(stack):
    query = 'tiled_ingest_tiles_total{job="node"}'
    result = wait_for_data(stack["ports"]["prom"], query)["data"]["result"]
    assert [float(item["value"][1]) for item in result] == [120]
