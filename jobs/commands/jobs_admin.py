"""`igfiqa jobs status|logs|cancel JOB_ID`: look after submitted SLURM jobs.

Thin wrappers over squeue, sacct and scancel, plus submitit's log files
(`FOLDER/<job id>_<task>_log.out|err`). The log folder is found through `scontrol show job`
while SLURM still holds the job (MinJobAge, 5 minutes by default); after that, pass the
`--folder` that `igfiqa submit` printed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DESCRIPTION = """\
Look after SLURM jobs submitted by igfiqa (training, prep arrays, evaluation).

examples:
  igfiqa jobs status 1234
  igfiqa jobs logs 1234 --tail 100
  igfiqa jobs logs 1234_7 --folder runs/igfiqa/submitit/20250101-120000
  igfiqa jobs cancel 1234
  igfiqa jobs status 100004 --cluster slurm/clusters/local-2node.yaml   # a job of another cluster
"""

_JOB_ID = re.compile(r"^\d+(_\d+)?$")
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "Elapsed", "NodeList", "Start", "End")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `jobs status`, `jobs logs` and `jobs cancel`."""
    jobs = sub.add_parser(
        "jobs",
        help="status, logs and cancellation of SLURM jobs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    status = actions.add_parser("status", help="state of the job and its steps (squeue + sacct)")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--folder", type=Path, help="submitit folder: also list the job's log files")
    status.set_defaults(func=run_status)

    logs = actions.add_parser("logs", help="print the job's submitit log files")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument(
        "--folder", type=Path, help="submitit folder (default: from scontrol while SLURM knows the job)"
    )
    logs.add_argument("--tail", type=int, default=50, help="last N lines of each file, 0 = all (default 50)")
    logs.add_argument("--task", type=int, default=None, help="only this task (rank); default all")
    logs.set_defaults(func=run_logs)

    cancel = actions.add_parser("cancel", help="scancel the job and report its final state")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store whose RUNNING runs of this job are marked KILLED "
        "(default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db; '' with --no-track skips)",
    )
    cancel.add_argument("--no-track", action="store_true", help="leave MLflow runs alone")
    cancel.set_defaults(func=run_cancel)
    for action in (status, logs, cancel):
        action.add_argument(
            "--cluster",
            type=Path,
            default=None,
            help="cluster profile of the job's cluster when it is not the default one (its slurm_conf); "
            "an exported SLURM_CONF works too",
        )


# ----------------------------------------------------------------------------- SLURM commands


def _user_error(message: str) -> Exception:
    from jobs.cli import UserError

    return UserError(message)


def _select_cluster(args: argparse.Namespace) -> None:
    """Ask the cluster of `--cluster PROFILE` (default: the one SLURM_CONF or /etc/slurm names)."""
    if getattr(args, "cluster", None) is not None:
        from jobs.cluster import load_profile, select_cluster

        select_cluster(load_profile(args.cluster))


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise _user_error(f"{job_id!r} is not a SLURM job id (expected e.g. 1234 or 1234_5)")
    return job_id


def _slurm(*command: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(command[0]) is None:
        raise _user_error(
            f"{command[0]} not found: no SLURM client here (start one with slurm/local/start.sh)"
        )
    return subprocess.run(list(command), capture_output=True, text=True, timeout=60)


def sacct_rows(job_id: str) -> list[dict[str, str]]:
    """The job and its steps as sacct reports them (empty when accounting does not know it)."""
    result = _slurm(
        "sacct", "--noheader", "--parsable2", "--jobs", job_id, f"--format={','.join(SACCT_FIELDS)}"
    )
    if result.returncode != 0:
        raise _user_error(f"sacct failed: {result.stderr.strip()}")
    return [dict(zip(SACCT_FIELDS, line.split("|"))) for line in result.stdout.splitlines() if line.strip()]


def squeue_state(job_id: str) -> str:
    """`STATE REASON` while the job is queued or running, else ""."""
    result = _slurm("squeue", "--noheader", "--jobs", job_id, "--format=%T %R")
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""


def log_folder_from_scontrol(job_id: str) -> Path | None:
    """The folder of the job's stdout file while slurmctld still holds the job."""
    result = _slurm("scontrol", "show", "job", job_id)
    match = re.search(r"StdOut=(\S+)", result.stdout) if result.returncode == 0 else None
    return Path(match.group(1)).parent if match else None


def log_files(folder: Path, job_id: str, task: int | None = None) -> list[Path]:
    """submitit's log files of a job (all array elements for an array's id), sorted."""
    task_part = "*" if task is None else str(task)
    patterns = [f"{job_id}_{task_part}_log.out", f"{job_id}_{task_part}_log.err"]
    if "_" not in job_id:  # an array's id: its elements are <id>_<element>_<task>
        patterns += [f"{job_id}_*_{task_part}_log.out", f"{job_id}_*_{task_part}_log.err"]
    return sorted({p for pattern in patterns for p in folder.glob(pattern)})


# ----------------------------------------------------------------------------- handlers


def run_status(args: argparse.Namespace) -> int:
    """Handler of `igfiqa jobs status`."""
    job_id = _check_job_id(args.job_id)
    _select_cluster(args)
    queued = squeue_state(job_id)
    rows = sacct_rows(job_id)
    if not rows and not queued:
        raise _user_error(f"job {job_id} is known neither to squeue nor to sacct")
    if queued:
        print(f"job {job_id}: {queued} (squeue)")
    if rows:
        widths = {f: max(len(f), *(len(r.get(f, "")) for r in rows)) for f in SACCT_FIELDS}
        print("  ".join(f.ljust(widths[f]) for f in SACCT_FIELDS))
        for row in rows:
            print("  ".join(row.get(f, "").ljust(widths[f]) for f in SACCT_FIELDS))
    folder = args.folder or log_folder_from_scontrol(job_id)
    if folder is not None:
        for path in log_files(Path(folder), job_id):
            print(f"log: {path}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """Handler of `igfiqa jobs logs`."""
    job_id = _check_job_id(args.job_id)
    _select_cluster(args)
    folder = args.folder or log_folder_from_scontrol(job_id)
    if folder is None:
        raise _user_error(
            f"SLURM no longer holds job {job_id}, so its log folder is unknown: "
            "pass --folder (the submitit folder igfiqa printed at submission)"
        )
    folder = Path(folder)
    if not folder.is_dir():
        raise _user_error(f"log folder {folder} does not exist")
    files = log_files(folder, job_id, args.task)
    if not files:
        raise _user_error(f"no log files of job {job_id} in {folder} (the job may not have started yet)")
    for path in files:
        lines = path.read_text(errors="replace").splitlines()
        shown = lines if args.tail <= 0 else lines[-args.tail :]
        skipped = f", last {len(shown)} of {len(lines)} lines" if len(shown) < len(lines) else ""
        print(f"==> {path}{skipped} <==")
        for line in shown:
            print(line)
    return 0


def run_cancel(args: argparse.Namespace, *, wait_s: float = 30.0) -> int:
    """Handler of `igfiqa jobs cancel`: scancel, then wait until accounting shows the job ended."""
    job_id = _check_job_id(args.job_id)
    _select_cluster(args)
    result = _slurm("scancel", job_id)
    if result.returncode != 0:
        raise _user_error(f"scancel {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
    deadline = time.monotonic() + wait_s
    state = ""
    while time.monotonic() < deadline:
        rows = [r for r in sacct_rows(job_id) if "." not in r["JobID"]]
        states = {r["State"].split()[0] for r in rows}
        state = ", ".join(sorted(states))
        if (
            rows
            and not squeue_state(job_id)
            and not states & {"PENDING", "RUNNING", "REQUEUED", "COMPLETING"}
        ):
            print(f"job {job_id}: {state}")
            _close_mlflow_runs(args, job_id)
            return 0
        time.sleep(0.5)
    print(f"job {job_id}: cancel requested, still {state or 'unknown'} after {wait_s:.0f} s")
    return 1


def _close_mlflow_runs(args: argparse.Namespace, job_id: str) -> None:
    """A job cancelled before it ran cannot close the MLflow run made at submission: do it here."""
    if getattr(args, "no_track", False):
        return
    from pipeline.tracking.store import close_runs_of_job

    try:
        closed = close_runs_of_job(job_id, getattr(args, "tracking_uri", ""))
    except Exception as exc:  # the cancellation itself succeeded; tracking is secondary
        print(f"job {job_id}: could not update its MLflow runs ({exc})", file=sys.stderr)
        return
    for run_id in closed:
        print(f"job {job_id}: MLflow run {run_id} marked KILLED")
