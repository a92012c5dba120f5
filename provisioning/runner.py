"""Running the playbooks through ansible-runner, with progress and a summary."""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

PLAYBOOKS_DIR = Path(__file__).resolve().parents[1] / "playbooks"


@dataclasses.dataclass
class HostSummary:
    """Task counts of one host, as in Ansible's play recap.

    ``ok`` counts every task that succeeded, changed or not, so ``changed`` is
    a part of it.
    """

    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0

    @property
    def succeeded(self) -> bool:
        return self.failed == 0 and self.unreachable == 0


@dataclasses.dataclass
class RunResult:
    status: str
    rc: int
    hosts: dict[str, HostSummary]

    @property
    def succeeded(self) -> bool:
        return (
            self.status == "successful"
            and self.rc == 0
            and all(host.succeeded for host in self.hosts.values())
        )


# Fields of the playbook_on_stats event and the summary field each one feeds.
_STATS_FIELDS = {
    "ok": "ok",
    "changed": "changed",
    "failures": "failed",
    "dark": "unreachable",
    "skipped": "skipped",
}


def summarize(events: Iterable[Mapping[str, Any]]) -> dict[str, HostSummary]:
    """Build per-host counts from ansible-runner events.

    The counts come from the last ``playbook_on_stats`` event, Ansible's own
    recap. When a run stops before it (a crash, a syntax error), they are
    counted from the per-task events seen so far.
    """
    events = list(events)
    stats = [event for event in events if event.get("event") == "playbook_on_stats"]
    if stats:
        return _from_stats(stats[-1].get("event_data") or {})
    return _from_task_events(events)


def _from_stats(data: Mapping[str, Any]) -> dict[str, HostSummary]:
    hosts: dict[str, HostSummary] = {}
    for field, attribute in _STATS_FIELDS.items():
        for host, count in (data.get(field) or {}).items():
            summary = hosts.setdefault(host, HostSummary())
            setattr(summary, attribute, int(count))
    return dict(sorted(hosts.items()))


def _from_task_events(events: list[Mapping[str, Any]]) -> dict[str, HostSummary]:
    hosts: dict[str, HostSummary] = {}
    for event in events:
        kind = event.get("event")
        data = event.get("event_data") or {}
        host = data.get("host")
        if not host or kind not in _TASK_EVENTS:
            continue
        summary = hosts.setdefault(host, HostSummary())
        if kind == "runner_on_ok":
            summary.ok += 1
            if (data.get("res") or {}).get("changed"):
                summary.changed += 1
        elif kind == "runner_on_failed":
            # Ansible counts an ignored failure as ok in its recap.
            if data.get("ignore_errors"):
                summary.ok += 1
            else:
                summary.failed += 1
        elif kind == "runner_on_unreachable":
            summary.unreachable += 1
        elif kind == "runner_on_skipped":
            summary.skipped += 1
    return dict(sorted(hosts.items()))


_TASK_EVENTS = {
    "runner_on_ok",
    "runner_on_failed",
    "runner_on_unreachable",
    "runner_on_skipped",
}


def format_event(event: Mapping[str, Any]) -> str | None:
    """Return the progress line of one event, or None for events not shown."""
    kind = event.get("event")
    data = event.get("event_data") or {}
    if kind == "playbook_on_play_start":
        return f"PLAY {data.get('play') or data.get('name') or ''}".rstrip()
    if kind not in _TASK_EVENTS:
        return None
    host = data.get("host", "?")
    task = data.get("task") or data.get("task_action") or "?"
    role = data.get("role")
    label = f"{role} : {task}" if role else task
    result = data.get("res") or {}
    if kind == "runner_on_ok":
        status = "changed" if result.get("changed") else "ok"
    elif kind == "runner_on_failed":
        status = "ignored" if data.get("ignore_errors") else "FAILED"
    elif kind == "runner_on_unreachable":
        status = "UNREACHABLE"
    else:
        status = "skipped"
    line = f"  {status:<11} {host:<16} {label}"
    if status in ("FAILED", "UNREACHABLE"):
        line += "\n" + _indent(_failure_text(result))
    diff = format_diff(result)
    if diff:
        line += "\n" + _indent(diff)
    return line


def format_diff(result: Mapping[str, Any]) -> str:
    """Return the unified diff of a task result run with ``--diff``, or ""."""
    diffs = []
    for item in [result, *(result.get("results") or [])]:
        entries = item.get("diff") if isinstance(item, Mapping) else None
        if isinstance(entries, Mapping):
            entries = [entries]
        for entry in entries or []:
            text = _diff_text(entry)
            if text:
                diffs.append(text)
    return "\n".join(diffs)


def _diff_text(entry: Mapping[str, Any]) -> str:
    if "prepared" in entry:
        return str(entry["prepared"]).rstrip()
    before, after = entry.get("before"), entry.get("after")
    if not isinstance(before, str) or not isinstance(after, str) or before == after:
        return ""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=str(entry.get("before_header") or "before"),
        tofile=str(entry.get("after_header") or "after"),
    )
    return "".join(lines).rstrip()


def _failure_text(result: Mapping[str, Any]) -> str:
    parts = [str(result.get("msg") or "").strip()]
    for key in ("stderr", "stdout", "module_stderr"):
        text = str(result.get(key) or "").strip()
        if text and text not in parts:
            parts.append(text[-2000:])
    return "\n".join(part for part in parts if part) or "(no message)"


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def format_summary(hosts: Mapping[str, HostSummary]) -> str:
    """Return the recap table: one line per host."""
    if not hosts:
        return "SUMMARY: no host ran a task"
    width = max(16, *(len(host) for host in hosts))
    lines = ["SUMMARY"]
    for host, summary in hosts.items():
        lines.append(
            f"  {host:<{width}} ok={summary.ok:<4} changed={summary.changed:<4} "
            f"failed={summary.failed:<4} unreachable={summary.unreachable:<4} "
            f"skipped={summary.skipped}"
        )
    return "\n".join(lines)


def run_playbook(
    playbook: str,
    inventory: Path,
    private_data_dir: Path,
    *,
    playbooks_dir: Path = PLAYBOOKS_DIR,
    check: bool = False,
    diff: bool = False,
    limit: str | None = None,
    tags: str | None = None,
    extravars: Mapping[str, Any] | None = None,
    out: TextIO = sys.stdout,
    on_event: Callable[[Mapping[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``playbook`` from ``playbooks_dir`` and stream one line per task result.

    ``ansible-playbook`` must be on PATH or next to this interpreter, because
    ansible-runner starts it as a process.
    """
    import ansible_runner  # imported here so that validation works without it

    events: list[Mapping[str, Any]] = []

    def handle(event: Mapping[str, Any]) -> bool:
        events.append(event)
        line = format_event(event)
        if line:
            print(line, file=out, flush=True)
        if on_event:
            on_event(event)
        # True keeps the event in the run's artifacts for later inspection.
        return True

    cmdline = []
    if check:
        cmdline.append("--check")
    if diff:
        cmdline.append("--diff")
    private_data_dir.mkdir(parents=True, exist_ok=True)
    # ansible-runner saves cmdline, extravars and envvars under env/ and reads
    # them back on the next run, so a --check run would turn later runs into
    # dry runs too. Each run starts from an empty env/.
    shutil.rmtree(private_data_dir / "env", ignore_errors=True)
    runner = ansible_runner.run(
        private_data_dir=str(private_data_dir),
        project_dir=str(playbooks_dir),
        playbook=playbook,
        inventory=str(inventory),
        cmdline=" ".join(cmdline) or None,
        limit=limit,
        tags=tags,
        extravars=dict(extravars or {}),
        envvars=_environment(playbooks_dir),
        event_handler=handle,
        quiet=True,
    )
    return RunResult(status=runner.status, rc=runner.rc, hosts=summarize(events))


def _environment(playbooks_dir: Path) -> dict[str, str]:
    # ansible-runner finds ansible-playbook on PATH; put the one installed with
    # this interpreter first, so a virtual environment works without activation.
    path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    return {
        "PATH": path,
        "ANSIBLE_CONFIG": str(playbooks_dir / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
    }
