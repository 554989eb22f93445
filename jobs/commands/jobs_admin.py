"""`igfiqa jobs status|logs|cancel JOB_ID`: look after submitted SLURM jobs.

Prints what `jobs.slurm` asks squeue, sacct, scontrol and scancel, plus submitit's log files
(`FOLDER/<job id>_<task>_log.out|err`). The log folder is found through `scontrol show job`
while SLURM still holds the job (MinJobAge, 5 minutes by default); after that, pass the
`--folder` that `igfiqa submit` printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs import slurm
from jobs.errors import UserError

DESCRIPTION = """\
Look after SLURM jobs submitted by igfiqa (training, prep arrays, evaluation).

examples:
  igfiqa jobs status 1234
  igfiqa jobs logs 1234 --tail 100
  igfiqa jobs logs 1234_7 --folder runs/tiny-cpu/submitit/20250101-120000
  igfiqa jobs cancel 1234
  igfiqa jobs status 100004 --cluster slurm/clusters/local-2node.yaml   # a job of another cluster
"""


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


def _select_cluster(args: argparse.Namespace) -> None:
    """Ask the cluster of `--cluster PROFILE` (default: the one SLURM_CONF or /etc/slurm names)."""
    if getattr(args, "cluster", None) is not None:
        from jobs.cluster import load_profile, select_cluster

        select_cluster(load_profile(args.cluster))


# ----------------------------------------------------------------------------- handlers


def run_status(args: argparse.Namespace) -> int:
    """Handler of `igfiqa jobs status`."""
    job_id = slurm.check_job_id(args.job_id)
    _select_cluster(args)
    queued = slurm.queued_job(job_id)
    rows = slurm.sacct_rows(job_id)
    if not rows and queued is None:
        raise UserError(f"job {job_id} is known neither to squeue nor to sacct")
    if queued is not None:
        print(f"job {job_id}: {queued.state} {queued.reason_or_nodes} (squeue)")
    if rows:
        table = [slurm.SACCT_FIELDS, *(row.cells() for row in rows)]
        widths = [max(len(line[i]) for line in table) for i in range(len(slurm.SACCT_FIELDS))]
        for line in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    folder = args.folder or slurm.log_folder_from_scontrol(job_id)
    if folder is not None:
        for path in slurm.log_files(Path(folder), job_id):
            print(f"log: {path}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """Handler of `igfiqa jobs logs`."""
    job_id = slurm.check_job_id(args.job_id)
    _select_cluster(args)
    folder = args.folder or slurm.log_folder_from_scontrol(job_id)
    if folder is None:
        raise UserError(
            f"SLURM no longer holds job {job_id}, so its log folder is unknown: "
            "pass --folder (the submitit folder igfiqa printed at submission)"
        )
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"log folder {folder} does not exist")
    files = slurm.log_files(folder, job_id, args.task)
    if not files:
        raise UserError(f"no log files of job {job_id} in {folder} (the job may not have started yet)")
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
    job_id = slurm.check_job_id(args.job_id)
    _select_cluster(args)
    outcome = slurm.cancel_job(job_id, wait_s=wait_s)
    if outcome.ended:
        print(f"job {job_id}: {outcome.state}")
        _close_mlflow_runs(args, job_id)
        return 0
    print(f"job {job_id}: cancel requested, still {outcome.state or 'unknown'} after {wait_s:.0f} s")
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
