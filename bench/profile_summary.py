#!/usr/bin/env python3
"""Summarize a py-spy `--format raw` profile (folded stacks) as two tables.

Self time: the share of samples whose innermost frame is each function.
Inclusive time: the share of samples with each function anywhere on the stack.

Usage: python bench/profile_summary.py tiled-profile.folded.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

# py-spy writes frames as "function (path/to/file.py:line)". The line number
# changes along one function, so it is dropped to group by function.
FRAME_PATTERN = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = FRAME_PATTERN.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match.group('function')} ({file})"


def summarize(folded: Path) -> tuple[int, collections.Counter, collections.Counter]:
    """Return the sample count, self counts and inclusive counts per function."""
    self_counts: collections.Counter = collections.Counter()
    inclusive_counts: collections.Counter = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";")]
        # The first frame is the thread (py-spy --threads) or process name.
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive_counts[name] += count
    return total, self_counts, inclusive_counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folded", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    total, self_counts, inclusive_counts = summarize(args.folded)
    if total == 0:
        print(f"{args.folded} contains no samples", file=sys.stderr)
        return 1
    print(f"{total} samples\n\nself %  function")
    for name, count in self_counts.most_common(args.top):
        print(f"{100 * count / total:6.1f}  {name}")
    print("\ninclusive %  function")
    for name, count in inclusive_counts.most_common(args.top):
        print(f"{100 * count / total:6.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
