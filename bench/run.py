#!/usr/bin/env python3
"""Benchmark tiled's hot DeepZoom tiles against nginx and IIPImage in one run.

Usage: python bench/run.py [--quick] [--peers ...]. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import load  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import slide  # noqa: E402

log = logging.getLogger("bench")

PEER_KEYS = (
    "nginx",
    "iip-memcached",
    "iip",
    "minimal",
    "minimal-low-level",
    "minimal-protocol",
    "tiled",
)
# minimal-low-level is left out by default to keep a full run short.
DEFAULT_PEERS = (
    "nginx",
    "iip-memcached",
    "iip",
    "minimal",
    "minimal-protocol",
    "tiled",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=15.0,
        help="seconds of load per wrk run (default 15)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="wrk runs per peer; the table shows the median (default 3)",
    )
    parser.add_argument(
        "--max-interference",
        type=float,
        default=10.0,
        help="a round counts as clean only if other processes kept the server "
        "and wrk from their CPUs at most this percent of the run (default 10)",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="maximum rounds to run while a peer has fewer than --rounds clean "
        "rounds (default twice --rounds)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short check: 3 s per run, 1 round"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="open wrk connections (default 32)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="wrk threads (default 1)"
    )
    parser.add_argument(
        "--tiles",
        type=int,
        default=2000,
        help="distinct tile URLs cycled by wrk (default 2000)",
    )
    parser.add_argument(
        "--levels",
        type=int,
        default=3,
        help="sample tiles from this many highest DeepZoom levels (default 3)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the tile sample")
    parser.add_argument("--width", type=int, default=40000, help="slide width in px")
    parser.add_argument("--height", type=int, default=30000, help="slide height in px")
    parser.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma-separated subset of {','.join(PEER_KEYS)} "
        f"(default {','.join(DEFAULT_PEERS)})",
    )
    parser.add_argument(
        "--server-cpu",
        default="0",
        help="CPU list for the servers, as taskset takes it (default 0)",
    )
    parser.add_argument(
        "--client-cpu", default="1", help="CPU list for wrk (default 1)"
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=Path(
            os.environ.get(
                "TILED_SAMPLES", BENCH_DIR.parent.parent / "shared" / "slides"
            )
        ),
        help="folder with the sample slides; the slide is built from "
        "CMU-1-Small-Region.svs found there, else from a synthetic "
        "texture (default: $TILED_SAMPLES, else shared/slides beside the "
        "repository, as the tests use)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=BENCH_DIR / ".data",
        help="cache of the slide, DeepZoom tree, tiled store and logs",
    )
    parser.add_argument(
        "--tiled-command",
        default=None,
        help="command that runs the tiled CLI (default: `tiled` on "
        "PATH, else `python -m tiled`)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="tiled",
        default=None,
        metavar="PEER",
        help="after the rounds, record PEER (default tiled) under load with py-spy",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile, also sample C frames (py-spy --native), which shows "
        "the time spent in uvloop, httptools and system calls",
    )
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="write the JSON results but leave bench/README.md alone",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: recompute the summary of a results file, "
        "rewrite it and the README section",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 3.0
        args.rounds = 1
    if args.max_rounds is None:
        args.max_rounds = 2 * args.rounds
    args.max_rounds = max(args.max_rounds, args.rounds)
    args.peer_keys = [key.strip() for key in args.peers.split(",") if key.strip()]
    unknown = set(args.peer_keys) - set(PEER_KEYS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {PEER_KEYS}")
    if args.profile and args.profile not in args.peer_keys:
        parser.error(f"--profile {args.profile}: not among --peers {args.peers}")
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration must be positive and --rounds at least 1")
    return args


def resolve_tiled_command(option: str | None) -> list[str] | None:
    if option:
        return shlex.split(option)
    found = shutil.which("tiled")
    if found:
        return [found]
    probe = subprocess.run(
        [sys.executable, "-c", "import tiled.cli"], capture_output=True
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "tiled"]
    return None


def prepare_slide(args: argparse.Namespace) -> slide.SlideInfo:
    data = args.data_dir
    info = slide.build_slide(
        data / "slide.tif", args.samples, args.width, args.height, args.seed
    )
    return info


def build_peers(
    args: argparse.Namespace, info: slide.SlideInfo, run_dir: Path
) -> tuple[list[peers.Peer], dict[str, str]]:
    """Create the requested peers; return them and the ones skipped, with why."""
    built: list[peers.Peer] = []
    skipped: dict[str, str] = {}
    for key in args.peer_keys:
        if key == "nginx":
            dz_dir = slide.build_dzsave_tree(info.path, args.data_dir / "dz")
            built.append(peers.NginxPeer(run_dir, args.server_cpu, dz_dir.parent))
        elif key == "iip-memcached":
            built.append(peers.IipPeer(run_dir, args.server_cpu, info.path, True))
        elif key == "iip":
            built.append(peers.IipPeer(run_dir, args.server_cpu, info.path, False))
        elif key.startswith("minimal"):
            dz_dir = slide.build_dzsave_tree(info.path, args.data_dir / "dz")
            built.append(
                peers.MinimalPeer(
                    run_dir,
                    args.server_cpu,
                    dz_dir.parent,
                    args.data_dir / "minimal-lmdb",
                    mode=key.removeprefix("minimal-") if "-" in key else "app",
                )
            )
        elif key == "tiled":
            command = resolve_tiled_command(args.tiled_command)
            if command is None:
                log.warning("tiled is not installed (pip install -e .); skipping it")
                skipped["tiled"] = "tiled CLI not installed"
                continue
            # tiled serves a folder, so give it one that holds only the slide.
            slide_dir = args.data_dir / "tiled-slides"
            slide_dir.mkdir(exist_ok=True)
            link = slide_dir / info.path.name
            link.unlink(missing_ok=True)
            os.link(info.path, link)
            tiled = peers.TiledPeer(
                run_dir, args.server_cpu, slide_dir, args.data_dir / "store", command
            )
            tiled.ingest(link)
            built.append(tiled)
        built[-1].option_key = key
    return built, skipped


def check_sizes(
    reference: peers.Peer, reference_sizes: dict, peer: peers.Peer, sizes: dict
) -> list[str]:
    """List tiles whose JPEG frame size differs from the reference peer's."""
    problems = []
    for key, expected in reference_sizes.items():
        if sizes.get(key) != expected:
            problems.append(
                f"{peer.name} tile {key} is {sizes.get(key)}, "
                f"{reference.name} returns {expected}"
            )
    return problems


def restart_failed_peer(
    peer: peers.Peer, failures: int, urls_file: Path, tiles: list[load.Tile]
) -> None:
    """Restart a peer whose round had failed requests, then warm it up again.

    Shared machines see helper processes vanish (a FastCGI backend killed
    from outside, say), and the rest of the run should not inherit that.
    """
    log.error(
        "%s: %d requests failed in this round; the round is dropped and the "
        "server restarted (logs in %s)",
        peer.name,
        failures,
        peer.run_dir,
    )
    peer.stop()
    peer.processes = []
    peer.start()
    paths = urls_file.read_text().split()
    warm = load.warm_up(peer.port, paths, tiles)
    if warm.errors:
        raise RuntimeError(f"{peer.name} still fails after a restart: {warm.errors[0]}")


def profile_peer(
    peer: peers.Peer, urls_file: Path, args: argparse.Namespace, out_dir: Path
) -> dict:
    """Record py-spy stacks of a Python server while wrk loads it.

    Returns the paths of the speedscope and folded-stack files and the wrk
    figures of the profiled runs, which py-spy slows down.
    """
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        log.warning("py-spy is not installed (pip install py-spy); no profile")
        return {}
    # taskset execs the server, so the group leader is the Python process.
    pid = str(peer.server_pids()[-1])
    seconds = max(int(args.duration), 5)
    outputs = {}
    for fmt, suffix in (("speedscope", "speedscope.json"), ("raw", "folded.txt")):
        target = out_dir / f"{peer.key}-profile.{suffix}"
        recorder = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                pid,
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                fmt,
                "--output",
                str(target),
                # py-spy pauses the process to unwind C frames, so --native
                # cannot be combined with --nonblocking and costs throughput.
                *(["--native"] if args.profile_native else ["--nonblocking"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(0.5)
        parsed, _ = load.run_wrk(
            peer.port,
            urls_file,
            seconds,
            args.connections,
            args.threads,
            args.client_cpu,
        )
        output, _ = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0 or not target.exists():
            log.warning(
                "py-spy record failed with status %s: %s",
                recorder.returncode,
                output.strip()[-500:],
            )
            continue
        outputs[fmt] = str(target)
        outputs[f"wrk_under_{fmt}_profile"] = parsed
    if "raw" in outputs:
        log.info("profile of %s written to %s", peer.name, outputs["raw"])
    return outputs


def measure(args: argparse.Namespace) -> dict:
    started = datetime.datetime.now(datetime.UTC)
    machine = report.describe_machine()
    if (machine["nproc"] or 1) < 2 and args.client_cpu != args.server_cpu:
        log.warning("one CPU only: wrk and the servers share CPU %s", args.server_cpu)
        args.client_cpu = args.server_cpu
    info = prepare_slide(args)
    tiles = load.sample_tiles(
        info.width, info.height, args.tiles, args.levels, args.seed
    )
    run_dir = args.data_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    built, skipped = build_peers(args, info, run_dir)

    peer_results: dict[str, dict] = {}
    urls_files: dict[str, Path] = {}
    reference: tuple[peers.Peer, dict] | None = None
    profile: dict = {}
    try:
        for peer in built:
            peer.start()
            paths = [peer.tile_path(tile) for tile in tiles]
            urls_file = run_dir / f"{peer.key}.urls"
            urls_file.write_text("\n".join(paths) + "\n")
            urls_files[peer.name] = urls_file
            warm_started = time.monotonic()
            warm = load.warm_up(peer.port, paths, tiles)
            warm_seconds = time.monotonic() - warm_started
            problems = list(warm.errors)
            if reference is None:
                reference = (peer, warm.sizes)
            else:
                problems += check_sizes(reference[0], reference[1], peer, warm.sizes)
            if problems:
                log.error(
                    "%s: %d problems in the warm-up pass, first: %s",
                    peer.name,
                    len(problems),
                    problems[0],
                )
            log.info(
                "%s warmed up: %d tiles in %.1f s", peer.name, len(paths), warm_seconds
            )
            peer_results[peer.name] = {
                "description": peer.description,
                "example_url": paths[0],
                "warmup_seconds": warm_seconds,
                "warmup_problems": problems[:20],
                "warmup_problem_count": len(problems),
                "mean_tile_bytes": warm.bytes_total / len(paths),
                "rounds": [],
            }

        round_index = 0
        while True:
            for peer in built:
                for process in peer.processes:
                    process.check_alive()
                parsed, raw = load.run_wrk(
                    peer.port,
                    urls_files[peer.name],
                    args.duration,
                    args.connections,
                    args.threads,
                    args.client_cpu,
                    peer.server_pids(),
                )
                report.classify_round(
                    parsed, args.server_cpu, args.client_cpu, args.max_interference
                )
                (run_dir / f"{peer.key}.wrk{round_index}.txt").write_text(raw)
                peer_results[peer.name]["rounds"].append(parsed)
                if parsed["failed"]:
                    restart_failed_peer(
                        peer,
                        parsed["non_2xx"] + parsed["socket_errors"],
                        urls_files[peer.name],
                        tiles,
                    )
                log.info(
                    "round %d %-32s %9.0f req/s  p50 %6.2f ms  p99 %6.2f ms  "
                    "CPU server %3.0f%% wrk %3.0f%% interference %3.0f%%",
                    round_index + 1,
                    peer.name,
                    parsed["requests_per_second"],
                    parsed.get("p50_ms", float("nan")),
                    parsed.get("p99_ms", float("nan")),
                    parsed.get("server_cpu_percent", float("nan")),
                    parsed["client_cpu_percent"],
                    parsed["interference_percent"] or 0.0,
                )
                time.sleep(1.0)
            round_index += 1
            fewest_clean = min(
                sum(
                    round_["clean"] and not round_["failed"]
                    for round_ in result["rounds"]
                )
                for result in peer_results.values()
            )
            if round_index >= args.rounds and fewest_clean >= args.rounds:
                break
            if round_index >= args.max_rounds:
                if fewest_clean < args.rounds:
                    log.warning(
                        "only %d rounds of some peer had other processes in "
                        "the way under %.0f%% of the time; the machine is busy",
                        fewest_clean,
                        args.max_interference,
                    )
                break
            if round_index >= args.rounds:
                log.info("other processes loaded the CPUs; running one more round")

        if args.profile:
            profiled = [peer for peer in built if peer.option_key == args.profile]
            if profiled:
                # run/ is wiped by the next run, so profiles are kept apart.
                profile_dir = (
                    args.data_dir / "profiles" / started.strftime("%Y%m%dT%H%M%SZ")
                )
                profile_dir.mkdir(parents=True, exist_ok=True)
                profile = profile_peer(
                    profiled[0], urls_files[profiled[0].name], args, profile_dir
                )
    finally:
        for peer in built:
            peer.stop()

    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    return {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "results_file": f"{stamp}.json",
        "command": shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        "machine": machine,
        "source": describe_tiled_source(),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "threads": args.threads,
            "tiles": args.tiles,
            "levels": args.levels,
            "seed": args.seed,
            "server_cpu": args.server_cpu,
            "client_cpu": args.client_cpu,
            "max_interference_percent": args.max_interference,
            "max_rounds": args.max_rounds,
        },
        "slide": {
            "width": info.width,
            "height": info.height,
            "source": info.source,
            "bytes": info.path.stat().st_size,
        },
        "tile_levels": sorted({tile.level for tile in tiles}, reverse=True),
        "peers": peer_results,
        "skipped": skipped,
        "profile": profile,
    }


def describe_tiled_source() -> dict:
    """Return the repository commit and whether tiled/ has uncommitted edits."""
    repo = BENCH_DIR.parent

    def git(*arguments: str) -> str:
        completed = subprocess.run(
            ["git", "-C", str(repo), *arguments], capture_output=True, text=True
        )
        return completed.stdout.strip() if completed.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "tiled_modified": bool(git("status", "--porcelain", "--", "tiled")),
    }


def stop_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so the servers started so far are stopped."""
    raise SystemExit(128 + signum)


def lock_data_dir(data_dir: Path) -> TextIO:
    """Lock data_dir for this run and return the open lock file.

    Two runs at once would share the run folder and load the same CPUs.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_file = (data_dir / "run.lock").open("w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(
            f"another bench/run.py is using {data_dir}; wait for it to finish"
        ) from None
    return lock_file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.render:
        result = json.loads(args.render.read_text())
    else:
        lock = lock_data_dir(args.data_dir)
        result = measure(args)
        lock.close()
    report.add_summaries(result)
    path = report.write_results(BENCH_DIR / "results", result)
    log.info("wrote %s", path)
    section = report.render_section(result)
    print(section)
    if not args.no_readme:
        report.update_readme(BENCH_DIR / "README.md", section)
    failed = [target for target in result["targets"] if not target["passed"]]
    for target in failed:
        log.warning(
            "target missed: %s (measured %s)", target["target"], target["value"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
