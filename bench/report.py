"""Machine description, result JSON and the generated section of bench/README.md."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

README_START = "<!-- results:start (written by bench/run.py) -->"
README_END = "<!-- results:end -->"


def command_version(command: list[str], pattern: str = r"[\d]+\.[\d.]+[\w.+-]*") -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    match = re.search(pattern, completed.stdout + completed.stderr)
    return match.group(0) if match else "unknown"


def debian_version(package: str) -> str:
    return command_version(["dpkg-query", "-W", "-f", "${Version}", package], r"\S+")


def describe_machine() -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "nginx": command_version(["nginx", "-v"]),
            "lighttpd": command_version(["lighttpd", "-v"]),
            "iipimage-server": debian_version("iipimage-server"),
            "memcached": command_version(["memcached", "-V"]),
            "wrk": command_version(["wrk", "-v"]),
            "vips": command_version(["vips", "--version"]),
        },
    }


def interference(round_: dict, server_cpu: str, client_cpu: str) -> float | None:
    """Return the percent of a run that other processes kept ours off a CPU.

    On each side (the server on its CPU, wrk on its own) that is the smaller of
    two times: how long our processes were runnable but waited (run delay),
    and how long other processes ran on that CPU. The run delay alone would
    also count a multi-process server (lighttpd, iipsrv and memcached) waiting
    for itself. Returns None when the CPUs are not two single, distinct CPUs
    or the round lacks the figures.
    """
    busy = round_.get("cpu_busy_percent", {})
    if server_cpu == client_cpu or server_cpu not in busy or client_cpu not in busy:
        return None
    if "client_wait_percent" not in round_:
        return None
    server_other = max(0.0, busy[server_cpu] - round_.get("server_cpu_percent", 0.0))
    client_other = max(0.0, busy[client_cpu] - round_["client_cpu_percent"])
    server_side = min(round_.get("server_wait_percent", 0.0), server_other)
    client_side = min(round_["client_wait_percent"], client_other)
    return max(server_side, client_side)


def max_interference(settings: dict) -> float:
    # Results of older versions of run.py name the threshold differently.
    return settings.get(
        "max_interference_percent", settings.get("max_cpu_wait_percent", 10.0)
    )


def classify_round(
    round_: dict, server_cpu: str, client_cpu: str, max_interference: float
) -> None:
    """Mark a round failed (requests failed) or clean (little interference)."""
    round_["interference_percent"] = interference(round_, server_cpu, client_cpu)
    round_["clean"] = (
        round_["interference_percent"] is None
        or round_["interference_percent"] <= max_interference
    )
    failures = round_["non_2xx"] + round_["socket_errors"]
    round_["failed"] = failures > 0.001 * round_.get("requests", 0)


def usable_rounds(rounds: list[dict]) -> list[dict]:
    """Return the clean rounds, or every round when none was clean.

    Rounds with failed requests are never used.
    """
    working = [round_ for round_ in rounds if not round_.get("failed", False)]
    clean = [round_ for round_ in working if round_.get("clean", True)]
    return clean or working


def summarize(rounds: list[dict]) -> dict:
    """Take the median of each figure over the usable rounds of one peer."""
    summary = {
        "rounds_clean": sum(
            r.get("clean", True) and not r.get("failed", False) for r in rounds
        ),
        "rounds_failed": sum(r.get("failed", False) for r in rounds),
        "rounds_run": len(rounds),
        "errors": sum(r["non_2xx"] + r["socket_errors"] for r in rounds),
    }
    rounds = usable_rounds(rounds)
    for field in (
        "requests_per_second",
        "p50_ms",
        "p99_ms",
        "server_cpu_percent",
        "client_cpu_percent",
        "other_load_percent",
        "interference_percent",
        "server_cpu_us_per_request",
    ):
        values = [round_[field] for round_ in rounds if round_.get(field) is not None]
        summary[field] = statistics.median(values) if values else None
    return summary


def median_ratio(rounds: list[dict], reference_rounds: list[dict]) -> float | None:
    """Return the median over rounds of req/s divided by the reference's req/s.

    The peers take turns within a round, so pairing them round by round
    cancels most of the drift in background load on a shared machine. Pairs
    where both rounds were clean are used when there are any, and pairs with
    a failed round never.
    """
    pairs = [
        (mine, theirs)
        for mine, theirs in zip(rounds, reference_rounds, strict=False)
        if theirs["requests_per_second"] > 0
        and not mine.get("failed", False)
        and not theirs.get("failed", False)
    ]
    clean_pairs = [
        (mine, theirs)
        for mine, theirs in pairs
        if mine.get("clean", True) and theirs.get("clean", True)
    ]
    ratios = [
        mine["requests_per_second"] / theirs["requests_per_second"]
        for mine, theirs in clean_pairs or pairs
    ]
    return statistics.median(ratios) if ratios else None


def add_ratios(summaries: dict[str, dict], peer_results: dict[str, dict]) -> None:
    """Store each peer's ratios to nginx and to IIPImage + memcached."""
    for reference, field in (
        ("nginx static", "ratio_to_nginx"),
        ("IIPImage + memcached", "ratio_to_iip_memcached"),
    ):
        for name, summary in summaries.items():
            if reference in peer_results:
                summary[field] = median_ratio(
                    peer_results[name]["rounds"], peer_results[reference]["rounds"]
                )
            else:
                summary[field] = None


def evaluate_targets(summaries: dict[str, dict], connections: int) -> list[dict]:
    """Check tiled against the targets the project sets for hot tiles."""
    tiled = summaries.get("tiled")
    nginx = summaries.get("nginx static")
    iip = summaries.get("IIPImage + memcached")
    if tiled is None:
        return []
    targets = []
    if iip is not None:
        value = tiled["ratio_to_iip_memcached"]
        targets.append(
            {
                "target": "tiled >= 3x IIPImage + memcached (req/s)",
                "value": f"{value:.2f}x" if value else "n/a",
                "passed": bool(value and value >= 3.0),
            }
        )
    if nginx is not None:
        value = tiled["ratio_to_nginx"]
        targets.append(
            {
                "target": "tiled >= 0.3x nginx static (req/s)",
                "value": f"{value:.2f}x" if value else "n/a",
                "passed": bool(value and value >= 0.3),
            }
        )
    targets += capacity_targets(tiled, nginx, iip)
    p99 = tiled["p99_ms"]
    targets.append(
        {
            "target": f"tiled p99 < 10 ms at {connections} connections",
            "value": f"{p99:.2f} ms" if p99 is not None else "n/a",
            "passed": p99 is not None and p99 < 10.0,
        }
    )
    if tiled["errors"]:
        targets.append(
            {
                "target": "tiled answers every request with 2xx",
                "value": f"{tiled['errors']} errors",
                "passed": False,
            }
        )
    return targets


def capacity_targets(tiled: dict, nginx: dict | None, iip: dict | None) -> list[dict]:
    """Check the throughput targets on server CPU time per request.

    One core serves 1e6 / (CPU µs per request) requests per second when the
    server is the bottleneck, so the ratio of CPU costs is the ratio of
    one-core capacities. It holds up when other processes share the CPUs,
    which req/s does not. For nginx it is stricter than req/s, because wrk on
    one core cannot load nginx fully.
    """
    targets = []
    tiled_cost = tiled.get("server_cpu_us_per_request")
    if not tiled_cost:
        return targets
    for reference, label, threshold in (
        (iip, "IIPImage + memcached", 3.0),
        (nginx, "nginx static", 0.3),
    ):
        reference_cost = reference and reference.get("server_cpu_us_per_request")
        if not reference_cost:
            continue
        value = reference_cost / tiled_cost
        targets.append(
            {
                "target": f"tiled >= {threshold:g}x {label} (CPU time per request)",
                "value": f"{value:.2f}x",
                "passed": value >= threshold,
            }
        )
    return targets


def add_summaries(result: dict) -> None:
    """Compute the medians, ratios and targets of a result from its rounds."""
    peer_results = result["peers"]
    settings = result["settings"]
    summaries = {}
    for name, peer_result in peer_results.items():
        # Classify again, so results of older versions of this script render
        # with the current rules.
        for round_ in peer_result["rounds"]:
            if "client_wait_percent" in round_:
                classify_round(
                    round_,
                    settings["server_cpu"],
                    settings["client_cpu"],
                    max_interference(settings),
                )
            else:
                round_.setdefault("interference_percent", None)
                failures = round_["non_2xx"] + round_["socket_errors"]
                round_["failed"] = failures > 0.001 * round_.get("requests", 0)
        summaries[name] = summarize(peer_result["rounds"])
        summaries[name]["errors"] += peer_result["warmup_problem_count"]
    add_ratios(summaries, peer_results)
    result["summaries"] = summaries
    result["targets"] = evaluate_targets(summaries, result["settings"]["connections"])


def format_number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def describe_source(result: dict) -> str:
    source = result.get("source")
    if not source:
        return ""
    text = f", repository at {source['commit'][:7]}"
    if source["tiled_modified"]:
        text += " with uncommitted changes in tiled/"
    return text


def describe_rounds(settings: dict) -> str:
    """Explain which rounds the medians use and what the CPU columns mean."""
    if "max_other_load_percent" not in settings:
        rule = (
            "other processes kept the server and wrk from their CPUs at most "
            f"{max_interference(settings):g} % of the run"
        )
    else:
        rule = (
            "other processes took at most "
            f"{settings['max_other_load_percent']:g} % of either CPU"
        )
    return (
        f"Figures are medians over the clean rounds ({rule}), or over all "
        "rounds without failed requests when none was clean. Ratios are medians "
        "of the ratios within each round. Server and wrk CPU are in percent of "
        "one core, and server CPU per request is the steadiest figure on a busy "
        "machine. Interference is the share of the run in which the server or "
        "wrk was runnable but other processes held its CPU."
    )


def render_section(result: dict) -> str:
    summaries = result["summaries"]
    settings = result["settings"]
    machine = result["machine"]
    lines = [
        README_START,
        "",
        f"## Latest run: {result['started']}",
        "",
        f"Command: `{result['command']}`{describe_source(result)}",
        "",
        f"Machine: {machine['nproc']} CPUs, {machine['cpu_model']}, "
        f"Linux {machine['kernel']}, Python {machine['python']}. "
        f"Servers pinned to CPU {settings['server_cpu']}, wrk to CPU "
        f"{settings['client_cpu']}.",
        "",
        f"Load: wrk -t{settings['threads']} -c{settings['connections']} "
        f"-d{settings['duration_s']:g}s, {settings['tiles']} distinct tiles over the "
        f"{settings['levels']} highest DeepZoom levels of a "
        f"{result['slide']['width']}x{result['slide']['height']} slide "
        f"({result['slide']['source']}), after one warm-up pass.",
        "",
        describe_rounds(settings),
        "",
        "| peer | req/s | ratio to nginx | ratio to IIPImage + memcached "
        "| p50 ms | p99 ms | server CPU µs/request | server CPU % | wrk CPU % "
        "| interference % | clean rounds | failed rounds | errors "
        "| mean tile bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary in summaries.items():
        lines.append(
            f"| {name} | {format_number(summary['requests_per_second'])} "
            f"| {format_number(summary['ratio_to_nginx'], 2)} "
            f"| {format_number(summary['ratio_to_iip_memcached'], 2)} "
            f"| {format_number(summary['p50_ms'], 2)} "
            f"| {format_number(summary['p99_ms'], 2)} "
            f"| {format_number(summary['server_cpu_us_per_request'], 1)} "
            f"| {format_number(summary['server_cpu_percent'])} "
            f"| {format_number(summary['client_cpu_percent'])} "
            f"| {format_number(summary['interference_percent'])} "
            f"| {summary['rounds_clean']}/{summary['rounds_run']} "
            f"| {summary['rounds_failed']} "
            f"| {summary['errors']} "
            f"| {format_number(result['peers'][name]['mean_tile_bytes'])} |"
        )
    for name in result.get("skipped", {}):
        lines.append(f"| {name} | not run: {result['skipped'][name]} " + "| " * 12)
    targets = result.get("targets", [])
    if targets:
        lines += ["", "| target | measured | result |", "|---|---:|---|"]
        for target in targets:
            verdict = "pass" if target["passed"] else "FAIL"
            lines.append(f"| {target['target']} | {target['value']} | {verdict} |")
    lines += [
        "",
        f"Raw results: `bench/results/{result['results_file']}`. The machine is "
        "shared and noisy, so compare the ratios within one run, not absolute "
        "numbers across runs.",
        "",
        README_END,
    ]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace the generated section of readme, or append one."""
    text = readme.read_text() if readme.exists() else ""
    if README_START in text and README_END in text:
        before = text.split(README_START, 1)[0]
        after = text.split(README_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)


def write_results(results_dir: Path, result: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / result["results_file"]
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
