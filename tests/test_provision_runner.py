"""Progress lines and summaries built from ansible-runner events."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from provisioning import cli
from provisioning.runner import (
    HostSummary,
    RunResult,
    format_diff,
    format_event,
    format_summary,
    run_playbook,
    summarize,
)


def task_event(kind: str, host: str, task: str = "Do it.", **data) -> dict:
    return {"event": kind, "event_data": {"host": host, "task": task, **data}}


STATS = {
    "event": "playbook_on_stats",
    "event_data": {
        "ok": {"store1": 40, "mon1": 12},
        "changed": {"store1": 3},
        "failures": {"mon1": 1},
        "dark": {"store2": 1},
        "skipped": {"store1": 2},
        "rescued": {},
        "ignored": {},
    },
}


def test_summary_from_stats_event() -> None:
    hosts = summarize([task_event("runner_on_ok", "store1"), STATS])

    assert hosts == {
        "mon1": HostSummary(ok=12, failed=1),
        "store1": HostSummary(ok=40, changed=3, skipped=2),
        "store2": HostSummary(unreachable=1),
    }


def test_summary_uses_last_stats_event() -> None:
    earlier = {"event": "playbook_on_stats", "event_data": {"ok": {"store1": 1}}}

    hosts = summarize([earlier, STATS])

    assert hosts["store1"].ok == 40


def test_summary_counted_from_tasks_without_stats() -> None:
    events = [
        task_event("runner_on_ok", "store1", res={"changed": True}),
        task_event("runner_on_ok", "store1", res={"changed": False}),
        task_event("runner_on_failed", "store1", res={"msg": "boom"}),
        task_event("runner_on_failed", "store1", ignore_errors=True, res={}),
        task_event("runner_on_skipped", "store2"),
        task_event("runner_on_unreachable", "mon1", res={"msg": "no route"}),
        task_event("runner_item_on_ok", "store1", res={"changed": True}),
        {"event": "verbose", "stdout": "noise"},
    ]

    hosts = summarize(events)

    assert hosts == {
        "mon1": HostSummary(unreachable=1),
        "store1": HostSummary(ok=3, changed=1, failed=1),
        "store2": HostSummary(skipped=1),
    }


def test_host_summary_success() -> None:
    assert HostSummary(ok=3, changed=2).succeeded
    assert not HostSummary(failed=1).succeeded
    assert not HostSummary(unreachable=1).succeeded


def test_run_result_fails_on_any_host() -> None:
    good = {"a": HostSummary(ok=1)}
    bad = {"a": HostSummary(ok=1), "b": HostSummary(failed=1)}

    assert RunResult("successful", 0, good).succeeded
    assert not RunResult("successful", 0, bad).succeeded
    assert not RunResult("failed", 2, good).succeeded


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            task_event(
                "runner_on_ok",
                "store1",
                "Copy.",
                role="tiled_storage",
                res={"changed": True},
            ),
            "  changed     store1           tiled_storage : Copy.",
        ),
        (
            task_event("runner_on_ok", "store1", "Copy.", res={"changed": False}),
            "  ok          store1           Copy.",
        ),
        (
            task_event("runner_on_skipped", "mon1", "Copy."),
            "  skipped     mon1             Copy.",
        ),
        (
            {
                "event": "playbook_on_play_start",
                "event_data": {"play": "Set up monitoring."},
            },
            "PLAY Set up monitoring.",
        ),
    ],
)
def test_progress_lines(event: dict, expected: str) -> None:
    assert format_event(event) == expected


def test_progress_line_of_failure_has_message() -> None:
    event = task_event(
        "runner_on_failed",
        "store2",
        "Mount.",
        res={"msg": "mount failed", "stderr": "bad superblock"},
    )

    line = format_event(event)

    assert line.startswith("  FAILED      store2           Mount.")
    assert "      mount failed" in line
    assert "      bad superblock" in line


def test_events_without_progress_line() -> None:
    assert format_event({"event": "verbose", "stdout": "x"}) is None
    assert format_event(task_event("runner_item_on_ok", "a")) is None


def test_diff_of_template_result() -> None:
    result = {
        "changed": True,
        "diff": [
            {
                "before": "port: 1\n",
                "after": "port: 2\n",
                "before_header": "/etc/tiled/tiled.yaml",
                "after_header": "dynamically generated",
            }
        ],
    }

    diff = format_diff(result)

    assert "--- /etc/tiled/tiled.yaml" in diff
    assert "-port: 1" in diff
    assert "+port: 2" in diff


def test_diff_of_loop_results() -> None:
    result = {"results": [{"diff": {"prepared": "+ new line"}}, {"diff": {}}]}

    assert format_diff(result) == "+ new line"


def test_summary_table() -> None:
    table = format_summary({"store1": HostSummary(ok=5, changed=1, skipped=2)})

    assert table.splitlines() == [
        "SUMMARY",
        "  store1           ok=5    changed=1    failed=0    unreachable=0"
        "    skipped=2",
    ]


def test_cli_rejects_invalid_file_before_writing(tmp_path: Path, capsys) -> None:
    cluster = tmp_path / "cluster.yml"
    cluster.write_text("nodes:\n  - {name: a, address: 10.0.0.1, roles: [storage]}\n")
    workdir = tmp_path / "work"

    status = cli.main([str(cluster), "--workdir", str(workdir)])

    assert status == cli.EXIT_INVALID
    assert "nodes[0] (a).disk: missing" in capsys.readouterr().err
    assert not workdir.exists()


def test_cli_validate_only_writes_inventory(tmp_path: Path, capsys) -> None:
    cluster = tmp_path / "cluster.yml"
    cluster.write_text(
        "nodes:\n  - {name: a, address: 10.0.0.1, roles: [storage], disk: /dev/vdb}\n"
    )
    workdir = tmp_path / "work"

    status = cli.main([str(cluster), "--workdir", str(workdir), "--validate-only"])

    assert status == 0
    assert (workdir / "inventory.yml").is_file()
    assert not (workdir / "wheelhouse").exists()
    assert "valid, 1 nodes" in capsys.readouterr().out


def test_run_forgets_previous_check_mode(tmp_path: Path, monkeypatch) -> None:
    ansible_runner = pytest.importorskip("ansible_runner")
    private_data_dir = tmp_path / "runner"
    (private_data_dir / "env").mkdir(parents=True)
    (private_data_dir / "env" / "cmdline").write_text("--check")
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        seen["cmdline_file"] = (private_data_dir / "env" / "cmdline").exists()
        kwargs["event_handler"](STATS)
        return SimpleNamespace(status="successful", rc=0)

    monkeypatch.setattr(ansible_runner, "run", fake_run)

    result = run_playbook(
        "site.yml", tmp_path / "inventory.yml", private_data_dir, out=io.StringIO()
    )

    assert seen["cmdline_file"] is False
    assert seen["cmdline"] is None
    assert seen["playbook"] == "site.yml"
    assert result.hosts["store1"].changed == 3
