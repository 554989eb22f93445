"""jobs.slurm: the parsing of sinfo, squeue, sacct and scontrol output, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import UserError
from jobs.slurm import (
    SACCT_FIELDS,
    AccountingRow,
    JobState,
    NodeState,
    QueuedJob,
    check_job_id,
    log_files,
    parse_sacct,
    parse_sinfo_nodes,
    parse_squeue_line,
    parse_stdout_folder,
)


def test_sinfo_nodes_keep_their_flags_and_only_working_states_are_usable() -> None:
    nodes = parse_sinfo_nodes("idle 4\nmixed~ 8\ndown* 16\ndrained 2\nallocated# ?\n")
    assert nodes == [
        NodeState("idle", 4),
        NodeState("mixed~", 8),
        NodeState("down*", 16),
        NodeState("drained", 2),
        NodeState("allocated#", None),
    ]
    assert [node.usable for node in nodes] == [True, True, False, False, False]
    assert parse_sinfo_nodes("") == []


def test_squeue_line_gives_state_reason_and_the_percent_r_column() -> None:
    assert parse_squeue_line("PENDING|Resources|(Resources)\n") == QueuedJob(
        "PENDING", "Resources", "(Resources)"
    )
    running = parse_squeue_line("RUNNING|None|node-1\nPENDING|Priority|(Priority)\n")
    assert running == QueuedJob("RUNNING", "None", "node-1")  # the first line (an array's first element)
    assert parse_squeue_line("  \n") is None


def test_sacct_rows_are_typed_and_short_lines_padded() -> None:
    stdout = (
        "87|demo|COMPLETED|0:0|00:01:02|node-1|2025-01-01T10:00:00|2025-01-01T10:01:02\n"
        "87.batch|batch|CANCELLED by 0|0:15|00:00:10|node-1|2025-01-01T10:00:00|Unknown\n"
        "\n"
        "88|short|PENDING\n"
    )
    rows = parse_sacct(stdout)
    assert [row.job_id for row in rows] == ["87", "87.batch", "88"]
    assert rows[0] == AccountingRow(
        "87", "demo", "COMPLETED", "0:0", "00:01:02", "node-1", "2025-01-01T10:00:00", "2025-01-01T10:01:02"
    )
    assert rows[1].is_step and not rows[0].is_step
    assert rows[1].state_name == "CANCELLED"
    assert rows[2].cells() == ("88", "short", "PENDING", "", "", "", "", "")
    assert len(rows[0].cells()) == len(SACCT_FIELDS)


def test_scontrol_stdout_gives_the_log_folder() -> None:
    text = "JobId=87 JobName=demo\n   StdErr=/runs/x/87_0_log.err\n   StdOut=/runs/x/87_0_log.out\n"
    assert parse_stdout_folder(text) == Path("/runs/x")
    assert parse_stdout_folder("JobId=87 JobName=demo\n") is None


def test_job_state_splits_the_detail_and_knows_terminal_states() -> None:
    cancelled = JobState.parse("CANCELLED by 1000")
    assert cancelled == JobState("CANCELLED", "by 1000")
    assert str(cancelled) == "CANCELLED by 1000" and cancelled.is_terminal
    assert not JobState.parse("RUNNING").is_terminal
    assert JobState.parse("") == JobState("UNKNOWN")


def test_job_ids_are_checked() -> None:
    assert check_job_id("1234") == "1234" and check_job_id("1234_5") == "1234_5"
    with pytest.raises(UserError, match="not a SLURM job id"):
        check_job_id("12x")


def test_log_files_of_a_job_and_of_an_array(tmp_path: Path) -> None:
    names = [
        "87_0_log.out",
        "87_0_log.err",
        "87_1_log.out",
        "90_3_0_log.out",
        "90_4_0_log.err",
        "9_0_log.out",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert [p.name for p in log_files(tmp_path, "87")] == ["87_0_log.err", "87_0_log.out", "87_1_log.out"]
    assert [p.name for p in log_files(tmp_path, "87", task=1)] == ["87_1_log.out"]
    assert [p.name for p in log_files(tmp_path, "90")] == ["90_3_0_log.out", "90_4_0_log.err"]
    assert [p.name for p in log_files(tmp_path, "90_3")] == ["90_3_0_log.out"]
