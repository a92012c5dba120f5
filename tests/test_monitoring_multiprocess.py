"""Multiprocess metrics: per-worker files merged into one /metrics body.

setup_multiprocess() changes process-wide state of prometheus_client, so the
unit checks run in a child interpreter, and the daemon check starts
``tiled serve --workers 2``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from test_monitoring_e2e import (
    HOST,
    Processes,
    fetch_all,
    free_port,
    http_get,
    missing_tile_urls,
    start_tiled,
    tile_urls,
    write_test_slide,
)

# Forks two workers one after the other, then reports the merged metrics while
# both are alive, after the parent marks the first dead, and after both.
FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from prometheus_client.parser import text_string_to_metric_families
    from tiled import metrics

    def snapshot():
        body, content_type = metrics.render_metrics()
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return {"content_type": content_type, "samples": samples}

    metrics.setup_multiprocess(sys.argv[1])
    metrics.HTTP_REQUESTS.labels("deepzoom", "GET", "2xx").inc(2)
    metrics.STORE_WRITES.inc()
    children = []
    for amount in (3, 4):
        pid = os.fork()
        if pid == 0:
            metrics.HTTP_REQUESTS.labels("deepzoom", "GET", "2xx").inc(amount)
            metrics.STORE_WRITES.inc(amount)
            metrics.HTTP_IN_FLIGHT.inc()
            metrics.STORE_SIZE.set(100 * amount)
            metrics.EVENT_LOOP_LAG.observe(0.001)
            os._exit(0)
        os.waitpid(pid, 0)
        children.append(pid)
    report = {"alive": snapshot()}
    metrics.mark_worker_dead(children[0])
    report["one_dead"] = snapshot()
    metrics.mark_worker_dead(children[1])
    report["both_dead"] = snapshot()
    report["files"] = sorted(os.listdir(sys.argv[1]))
    report["children"] = children
    print(json.dumps(report))
    """
)

REQUESTS = "tiled_http_requests_total{method=GET,route=deepzoom,status_class=2xx}"


@pytest.fixture(scope="module")
def fork_report(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("multiproc") / "metrics"
    # A stale file from an earlier run must not add to this run's counts.
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale")
    (directory / "notes.txt").write_text("not a metric file")
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_counters_add_across_processes(fork_report):
    samples = fork_report["alive"]["samples"]
    assert samples[REQUESTS] == 2 + 3 + 4
    assert samples["tiled_store_writes_total{}"] == 1 + 3 + 4
    assert samples["tiled_event_loop_lag_seconds_count{}"] == 2


def test_live_gauges_follow_workers(fork_report):
    assert fork_report["alive"]["samples"]["tiled_http_requests_in_flight{}"] == 2
    assert fork_report["one_dead"]["samples"]["tiled_http_requests_in_flight{}"] == 1
    assert fork_report["both_dead"]["samples"]["tiled_http_requests_in_flight{}"] == 0


def test_most_recent_gauge_of_live_workers(fork_report):
    # The second worker set the store size last.
    assert fork_report["alive"]["samples"]["tiled_store_size_bytes{}"] == 400
    assert fork_report["one_dead"]["samples"]["tiled_store_size_bytes{}"] == 400
    # The parent never set it, so with both workers gone the series is absent.
    assert "tiled_store_size_bytes{}" not in fork_report["both_dead"]["samples"]


def test_counters_survive_dead_workers(fork_report):
    samples = fork_report["both_dead"]["samples"]
    assert samples[REQUESTS] == 9
    assert samples["tiled_worker_exits_total{}"] == 2


def test_setup_deletes_only_metric_files(fork_report):
    assert "counter_1.db" not in fork_report["files"]
    assert "notes.txt" in fork_report["files"]


def test_dead_worker_live_files_removed(fork_report):
    files = fork_report["files"]
    for pid in fork_report["children"]:
        assert f"counter_{pid}.db" in files
        assert not [
            name for name in files if re.fullmatch(rf"gauge_live\w+_{pid}\.db", name)
        ]


def test_merged_body_has_no_pid_label(fork_report):
    for snapshot in ("alive", "one_dead", "both_dead"):
        for key in fork_report[snapshot]["samples"]:
            assert "pid=" not in key, key
    assert fork_report["alive"]["content_type"].startswith("text/plain; version=0.0.4")


def test_build_info_kept_after_setup(fork_report):
    samples = fork_report["alive"]["samples"]
    build = [key for key in samples if key.startswith("tiled_build_info{")]
    assert len(build) == 1
    assert samples[build[0]] == 1


# Daemon with two workers


def per_pid_requests(directory: Path, route: str) -> dict[int, dict[str, float]]:
    """Return the request counts of ``route`` by status class for each pid file."""
    counts: dict[int, dict[str, float]] = defaultdict(dict)
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name != "tiled_http_requests_total":
                    continue
                if sample.labels["route"] != route:
                    continue
                status_class = sample.labels["status_class"]
                counts[pid][status_class] = (
                    counts[pid].get(status_class, 0) + sample.value
                )
    return counts


def scrape(port: int) -> dict[str, list]:
    status, body = http_get(f"http://{HOST}:{port}/metrics")
    assert status == 200
    families = {}
    for family in text_string_to_metric_families(body.decode()):
        families[family.name] = family.samples
    return families


def test_two_workers_counts_add_up(tmp_path):
    slide_dir = tmp_path / "slides"
    slide_dir.mkdir()
    write_test_slide(slide_dir / "gradient.tiff")
    directory = tmp_path / "metrics"
    port = free_port()
    processes = Processes(tmp_path)
    try:
        parent = start_tiled(
            processes,
            slide_dir,
            tmp_path / "store",
            port,
            workers=2,
            env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
        )
        base = f"http://{HOST}:{port}"
        slide = json.loads(http_get(f"{base}/slides")[1])["slides"][0]
        urls = tile_urls(base, slide) + missing_tile_urls(base, slide, 10)
        sent = {"2xx": 0, "4xx": 0}
        # The kernel picks the worker that accepts each connection, so send
        # rounds until both workers have served tiles.
        for _ in range(10):
            statuses = fetch_all(urls)
            sent["2xx"] += statuses[200]
            sent["4xx"] += statuses[404]
            workers = per_pid_requests(directory, "deepzoom")
            workers.pop(parent.pid, None)
            if len(workers) >= 2:
                break
        assert len(workers) == 2, f"only worker pids {sorted(workers)} served tiles"

        for _ in range(6):
            families = scrape(port)
            totals = {"2xx": 0.0, "4xx": 0.0}
            for sample in families["tiled_http_requests"]:
                if sample.name != "tiled_http_requests_total":
                    continue
                if (
                    sample.labels["route"] == "deepzoom"
                    and sample.labels["status_class"] in totals
                ):
                    totals[sample.labels["status_class"]] += sample.value
            assert totals == sent
            # The scrape itself is the only request in flight, in one worker.
            assert families["tiled_http_requests_in_flight"][0].value == 1
            assert len(families["tiled_store_map_limit_bytes"]) == 1
            assert families["tiled_slides"][0].value == 1

        per_worker = per_pid_requests(directory, "deepzoom")
        summed = {
            status_class: sum(
                counts.get(status_class, 0) for counts in per_worker.values()
            )
            for status_class in sent
        }
        assert summed == sent
        worker_pids = set(per_worker) - {parent.pid}
    finally:
        processes.stop_all()

    assert parent.returncode == 0, processes.log("tiled")
    files = [path.name for path in directory.iterdir()]
    for pid in worker_pids:
        live = [
            name for name in files if re.fullmatch(rf"gauge_live\w+_{pid}\.db", name)
        ]
        assert not live, f"mark_worker_dead left {live}"
    exits = [
        sample.value
        for family in MultiProcessCollector(None, path=str(directory)).collect()
        for sample in family.samples
        if sample.name == "tiled_worker_exits_total"
    ]
    assert exits == [2]
