"""The ``tiled-provision`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from .cluster import ClusterError, load_cluster
from .inventory import write_inventory
from .runner import PLAYBOOKS_DIR, format_summary, run_playbook
from .wheelhouse import build_wheelhouse

# Exit statuses: 0 success, 1 a playbook failed, 2 the cluster file is invalid
# or the command was used wrongly (argparse's own convention).
EXIT_FAILED = 1
EXIT_INVALID = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiled-provision",
        description=(
            "Provision a tiled cluster with Ansible: validate the cluster file, write"
            " the inventory, build the wheelhouse and run the playbooks."
        ),
    )
    parser.add_argument("cluster", type=Path, help="cluster description (YAML)")
    parser.add_argument(
        "--playbook",
        default="site.yml",
        help="playbook to run from the playbooks folder (default: site.yml;"
        " upgrade.yml rolls the storage nodes one at a time)",
    )
    parser.add_argument("--check", action="store_true", help="dry run: change nothing")
    parser.add_argument("--diff", action="store_true", help="show changes to files")
    parser.add_argument(
        "--limit", help="run on these hosts only (Ansible host pattern)"
    )
    parser.add_argument(
        "--tags", help="run only tasks with these tags (comma-separated)"
    )
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        help="folder of ready wheels to install; overrides tiled.wheelhouse and"
        " skips building",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the inventory, wheelhouse and ansible-runner artifacts"
        " (default: a new temporary folder)",
    )
    parser.add_argument(
        "--playbooks-dir",
        type=Path,
        default=PLAYBOOKS_DIR,
        help=f"folder of site.yml and the roles (default: {PLAYBOOKS_DIR})",
    )
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="check the cluster file and write the inventory, then stop",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )

    # Validate before anything is written or built, so a bad file changes nothing.
    try:
        cluster = load_cluster(args.cluster)
    except ClusterError as error:
        print(f"tiled-provision: {error}", file=sys.stderr)
        return EXIT_INVALID
    playbook = args.playbooks_dir / args.playbook
    if not playbook.is_file():
        print(f"tiled-provision: playbook not found: {playbook}", file=sys.stderr)
        return EXIT_INVALID

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiled-provision-"))
    workdir = workdir.resolve()
    wheelhouse = args.wheelhouse or (
        Path(cluster.tiled.wheelhouse) if cluster.tiled.wheelhouse else None
    )
    if wheelhouse is None:
        wheelhouse = workdir / "wheelhouse"
        if not args.validate_only:
            print(f"Building the wheelhouse in {wheelhouse}", flush=True)
            try:
                build_wheelhouse(wheelhouse, cluster.tiled.wheel)
            except RuntimeError as error:
                print(f"tiled-provision: {error}", file=sys.stderr)
                return EXIT_FAILED
    inventory = write_inventory(
        cluster, wheelhouse.resolve(), workdir / "inventory.yml"
    )
    print(f"Inventory: {inventory}", flush=True)
    if args.validate_only:
        print(f"{args.cluster}: valid, {len(cluster.nodes)} nodes")
        return 0

    result = run_playbook(
        args.playbook,
        inventory,
        workdir / "runner",
        playbooks_dir=args.playbooks_dir.resolve(),
        check=args.check,
        diff=args.diff,
        limit=args.limit,
        tags=args.tags,
    )
    print(format_summary(result.hosts), flush=True)
    if not result.succeeded:
        print(
            f"tiled-provision: {args.playbook} {result.status} (ansible-playbook exit"
            f" code {result.rc}); artifacts in {workdir / 'runner' / 'artifacts'}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
