"""Every question asked of SLURM: sinfo, squeue, sacct, scontrol, scancel, and a submitit job's state.

The commands, the stages and the job objects ask through these functions only, so the flags,
timeouts and parsing of SLURM's output live in one place. Each `parse_*` function takes the
command's text output, so the parsing is tested without a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import UserError

if TYPE_CHECKING:
    from jobs.cluster import ClusterProfile

QUERY_TIMEOUT_S = 60.0
SINFO_TIMEOUT_S = 15.0
# States after which a job never runs again (requeues go through PENDING/REQUEUED).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "DEADLINE", "BOOT_FAIL"}
)
# States in which squeue still lists a job: it holds or will hold resources.
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
)
_NOT_ENDED_AFTER_CANCEL = frozenset({"PENDING", "RUNNING", "REQUEUED", "COMPLETING"})
_USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")
_NODE_STATE_FLAGS = "*~#!%$@^-"  # sinfo's suffixes: not responding, powered down, ...
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "Elapsed", "NodeList", "Start", "End")
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


class MissingSlurmClientError(UserError):
    """A SLURM command is not on PATH (no SLURM client installed here)."""


def check_job_id(job_id: str) -> str:
    """`job_id` itself when it is a SLURM job id (`1234` or an array element `1234_5`)."""
    if not _JOB_ID.match(job_id):
        raise UserError(f"{job_id!r} is not a SLURM job id (expected e.g. 1234 or 1234_5)")
    return job_id


def _run(*command: str, timeout_s: float = QUERY_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; its output as text (a missing command is MissingSlurmClientError)."""
    if shutil.which(command[0]) is None:
        raise MissingSlurmClientError(
            f"{command[0]} not found: no SLURM client here (start one with slurm/local/start.sh)"
        )
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )


# ----------------------------------------------------------------------------- sinfo: can a job run?


@dataclass(frozen=True)
class NodeState:
    """One line of `sinfo --format='%T %c'`: a node state (with sinfo's flags) and its CPUs."""

    state: str
    cpus: int | None

    @property
    def usable(self) -> bool:
        """The node takes jobs (idle, mixed, allocated or completing, whatever its flags)."""
        return self.cpus is not None and self.state.rstrip(_NODE_STATE_FLAGS) in _USABLE_NODE_STATES


def parse_sinfo_nodes(stdout: str) -> list[NodeState]:
    """The node lines of `sinfo --noheader --format='%T %c'`."""
    nodes = []
    for line in stdout.splitlines():
        state, _, cpus = line.strip().partition(" ")
        nodes.append(NodeState(state, int(cpus) if cpus.isdigit() else None))
    return nodes


def slurm_unavailable_reason(profile: ClusterProfile) -> str | None:
    """Why no training job can run on the profile's cluster from here, or None when it can."""
    if profile.executor != "slurm":
        return None  # submitit's local/debug executors need no cluster
    root_note = (
        "; starting the local cluster (slurm/local/start.sh, which make demo runs) needs root"
        if os.geteuid() != 0
        else "; start the local cluster with `make slurm-up` (slurm/local/start.sh)"
    )
    missing = [tool for tool in ("sinfo", "sbatch", "sacct") if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed here ({', '.join(missing)} not on PATH){root_note}"
    from jobs.cluster import ProfileError, select_cluster

    try:
        select_cluster(profile)  # ask the profile's cluster (slurm_conf), not the default one
    except ProfileError as exc:
        return str(exc)
    command = ["sinfo", "--noheader", "--format=%T %c"]
    if profile.partition:
        command.append(f"--partition={profile.partition}")
    try:
        result = _run(*command, timeout_s=SINFO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the SLURM controller did not answer sinfo within {SINFO_TIMEOUT_S:.0f} s{root_note}"
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the SLURM controller does not answer (sinfo: {detail}){root_note}"
    nodes = parse_sinfo_nodes(result.stdout)
    usable_cpus = [node.cpus for node in nodes if node.usable and node.cpus is not None]
    where = f"partition {profile.partition}" if profile.partition else "the cluster"
    if not usable_cpus:
        states = ", ".join(node.state for node in nodes) or "none"
        return f"no usable SLURM node in {where} (node states: {states}){root_note}"
    needed = profile.tasks_per_node * profile.cpus_per_task
    if max(usable_cpus) < needed:
        return (
            f"the profile {profile.source} asks for {needed} CPUs per node, "
            f"the largest node of {where} has {max(usable_cpus)}"
        )
    return None


# ----------------------------------------------------------------------------- squeue: queued jobs


@dataclass(frozen=True)
class QueuedJob:
    """A job as squeue lists it while SLURM still queues or runs it."""

    state: str  # %T: PENDING, RUNNING, ...
    reason: str  # %r: why it waits ("None" while it runs)
    reason_or_nodes: str  # %R: the reason in parentheses while pending, the node list while running


_SQUEUE_FORMAT = "--format=%T|%r|%R"


def parse_squeue_line(stdout: str) -> QueuedJob | None:
    """The first job line of `squeue --noheader --format=%T|%r|%R`, None when there is none."""
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    state, _, rest = lines[0].strip().partition("|")
    reason, _, reason_or_nodes = rest.partition("|")
    return QueuedJob(state, reason, reason_or_nodes)


def queued_job(job_id: str, *, timeout_s: float = QUERY_TIMEOUT_S) -> QueuedJob | None:
    """The job while squeue still lists it (queued, running, completing), else None."""
    result = _run("squeue", "--noheader", "--jobs", job_id, _SQUEUE_FORMAT, timeout_s=timeout_s)
    return parse_squeue_line(result.stdout) if result.returncode == 0 else None


# ----------------------------------------------------------------------------- sacct: accounting


@dataclass(frozen=True)
class AccountingRow:
    """One line of sacct for a job or one of its steps (`1234`, `1234.batch`, `1234.0`)."""

    job_id: str
    job_name: str
    state: str  # e.g. "COMPLETED", "CANCELLED by 0"
    exit_code: str
    elapsed: str
    node_list: str
    start: str
    end: str

    @property
    def is_step(self) -> bool:
        """A step of the job (its id has a dot), not the job or an array element itself."""
        return "." in self.job_id

    @property
    def state_name(self) -> str:
        """The state without sacct's detail: CANCELLED of "CANCELLED by 0"."""
        return self.state.split()[0] if self.state.strip() else ""

    def cells(self) -> tuple[str, ...]:
        """The values in SACCT_FIELDS order (for a table)."""
        return (
            self.job_id,
            self.job_name,
            self.state,
            self.exit_code,
            self.elapsed,
            self.node_list,
            self.start,
            self.end,
        )


def parse_sacct(stdout: str) -> list[AccountingRow]:
    """The rows of `sacct --noheader --parsable2 --format=<SACCT_FIELDS>`."""
    rows = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        values = (line.split("|") + [""] * len(SACCT_FIELDS))[: len(SACCT_FIELDS)]
        rows.append(AccountingRow(*values))
    return rows


def sacct_rows(job_id: str) -> list[AccountingRow]:
    """The job and its steps as sacct reports them (empty when accounting does not know it)."""
    result = _run(
        "sacct", "--noheader", "--parsable2", "--jobs", job_id, f"--format={','.join(SACCT_FIELDS)}"
    )
    if result.returncode != 0:
        raise UserError(f"sacct failed: {result.stderr.strip()}")
    return parse_sacct(result.stdout)


# ----------------------------------------------------------------------------- scontrol, scancel


def parse_stdout_folder(scontrol_text: str) -> Path | None:
    """The folder of `StdOut=` in `scontrol show job` output, None when absent."""
    match = re.search(r"StdOut=(\S+)", scontrol_text)
    return Path(match.group(1)).parent if match else None


def log_folder_from_scontrol(job_id: str) -> Path | None:
    """The folder of the job's stdout file while slurmctld still holds the job (MinJobAge)."""
    result = _run("scontrol", "show", "job", job_id)
    return parse_stdout_folder(result.stdout) if result.returncode == 0 else None


@dataclass(frozen=True)
class CancelOutcome:
    """What accounting said after a cancellation: whether the job ended, and its state(s)."""

    ended: bool
    state: str  # e.g. "CANCELLED"; several states comma-separated for an array; "" when unknown


def cancel_job(job_id: str, *, wait_s: float = 30.0, poll_s: float = 0.5) -> CancelOutcome:
    """scancel the job, then wait up to `wait_s` until squeue drops it and sacct shows it ended.

    A job SLURM does not know (neither queued nor in accounting) is a UserError at once.
    """
    if queued_job(job_id) is None and not sacct_rows(job_id):
        raise UserError(f"job {job_id} is unknown to SLURM (neither queued nor in accounting)")
    result = _run("scancel", job_id)
    if result.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
    deadline = time.monotonic() + wait_s
    state = ""
    while time.monotonic() < deadline:
        rows = [row for row in sacct_rows(job_id) if not row.is_step]
        states = {row.state_name for row in rows}
        state = ", ".join(sorted(states))
        if rows and queued_job(job_id) is None and not states & _NOT_ENDED_AFTER_CANCEL:
            return CancelOutcome(ended=True, state=state)
        time.sleep(poll_s)
    return CancelOutcome(ended=False, state=state)


# ----------------------------------------------------------------------------- submitit's view


@dataclass(frozen=True)
class JobState:
    """A job's state as accounting reports it: the name (COMPLETED, ...) and any detail ("by 0")."""

    name: str
    detail: str = ""

    @classmethod
    def parse(cls, text: str) -> JobState:
        """From sacct's state text, e.g. "CANCELLED by 0"; empty text is UNKNOWN."""
        name, _, detail = text.strip().partition(" ")
        return cls(name or "UNKNOWN", detail.strip())

    @property
    def is_terminal(self) -> bool:
        """The job will not run again (completed, failed, cancelled, timed out, ...)."""
        return self.name in TERMINAL_STATES

    def __str__(self) -> str:
        return f"{self.name} {self.detail}".strip()


def job_state(job: Any, *, refresh: bool) -> JobState:
    """The state of a submitit job's latest attempt; `refresh` asks sacct now, not submitit's cache.

    submitit refreshes its cache less and less often as a job ages (up to every 10 minutes).
    NODE_FAIL ends only an attempt when SLURM requeues the job (JobRequeue), but submitit takes
    it for the job's end and stops asking: the state is then asked from SLURM directly.
    """
    info = job.get_info(mode="force" if refresh else "standard")
    state = JobState.parse(info.get("State") or job.state or "UNKNOWN")
    if state.name == "NODE_FAIL":
        return latest_attempt_state(str(job.job_id)) or state
    return state


def latest_attempt_state(job_id: str) -> JobState | None:
    """The state of a job's latest attempt: squeue's while SLURM holds it, else sacct's (None: unknown)."""
    queued = queued_job(job_id)
    if queued is not None:
        return JobState.parse(queued.state)
    result = _run("sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id, "--format=State")
    lines = [line for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []
    return JobState.parse(lines[-1]) if lines else None


def log_files(folder: Path, job_id: str, task: int | None = None) -> list[Path]:
    """submitit's log files of a job (every array element for an array's id), sorted."""
    task_part = "*" if task is None else str(task)
    patterns = [f"{job_id}_{task_part}_log.out", f"{job_id}_{task_part}_log.err"]
    if "_" not in job_id:  # an array's id: its elements are <id>_<element>_<task>
        patterns += [f"{job_id}_*_{task_part}_log.out", f"{job_id}_*_{task_part}_log.err"]
    return sorted({p for pattern in patterns for p in folder.glob(pattern)})
