"""`igfiqa demo`: the main job end to end on the embedded synthetic data, in a few minutes on a CPU.

Stages, each reused when a previous run finished it (so the demo is resumable and a
second run only prints the summary):

  1 synth      the synthetic dataset (InsightFace RecordIO + verification .bin files)
  2 convert    the training set into DALI shards            (reused: train/dataset.json exists)
  3 bins       the verification sets into shards            (reused: val/<set>/dataset.json exist)
  4 preview    the augmentation grid of the regression half (reused: the PNG exists)
  5 train      the small backbone in IG mode: on the local SLURM cluster through submitit, or
               here (launch_local) when no cluster can run, saying why (reused: a completed run)
  6 evaluate   the final checkpoint on the verification sets (EDC/ERC, table), logged to MLflow
               as a child run of the training run              (reused: the same checkpoint)

The training run directory keeps checkpoints, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
DEFAULT_CLUSTER = REPO / "slurm" / "clusters" / "local.yaml"
# 0 = the config's full schedule: tiny_cpu's 4 epochs (148 steps at 200 identities), so the
# whole demo takes ~3 min on 2 quiet CPU cores and ~5 min on busy ones.
DEFAULT_STEPS = 0
# The synthetic verification sets hold 150 non-mated pairs at the default size: 1e-1 is an FMR
# they resolve, 1e-3 the paper's (reported with a resolution warning).
DEFAULT_FMRS = (1e-1, 1e-3)
DEFAULT_IDENTITIES = 200
STAGE_COUNT = 6
TRAIN_MARKER = "demo-train.json"  # in the run directory, written when training completed
JOB_MARKER = "demo-job.json"  # in the run directory, the SLURM job of the last submission
EVAL_MARKER = "demo-eval.json"  # in the eval directory, written once the eval run is logged
PREVIEW_NAME = "augmentation_preview.png"
PENDING_NOTE_EVERY_S = 30.0
POLL_S = 2.0
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")

DESCRIPTION = """\
Run the whole IG-FIQA job on the embedded synthetic data, in a few minutes on a CPU:

  1 synthesize   identities × images, plus clean.bin and mixed.bin verification sets
  2 convert      the training set into DALI shards
  3 bins         the verification sets into shards
  4 preview      the augmentation grid (clean image beside its regression-half versions)
  5 train        configs/tiny_cpu.yaml in IG mode, 2 tasks on the local SLURM cluster through
                 submitit (its log is followed until it ends); here instead when no cluster can
                 run (no SLURM, the controller does not answer, --local), saying why
  6 evaluate     EDC/ERC and verification accuracy on both sets, an MLflow child run of training

Everything goes under --out: synth/, train/, val/, augmentation_preview.png, run/ (checkpoints,
plots, submitit logs), eval/ (table.md, quality_<set>.png, ...), mlflow.db and mlartifacts/.
Running it again reuses every finished stage (an interrupted training resumes from its last
checkpoint) and prints the summary again; remove --out to start afresh.

examples:
  igfiqa demo                                   # what `make demo` runs
  igfiqa demo --local --steps 40                # no cluster, a shorter training
  igfiqa demo --out work/demo-small --identities 40 --steps 20
"""


# ----------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    """Add `igfiqa demo`."""
    p = sub.add_parser(
        "demo",
        help="the whole chain on synthetic data: prep, train (SLURM or here), evaluate, MLflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("work/demo"), help="output folder (default: work/demo)")
    p.add_argument("--local", action="store_true", help="train here even when a SLURM cluster is up")
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        metavar="N",
        help="stop training after N steps (default: 0 = the config's full schedule, 4 epochs = 148 steps "
        "at 200 identities); N beyond the schedule needs --set optim.epochs=E",
    )
    p.add_argument(
        "--fmr",
        nargs="+",
        type=float,
        default=list(DEFAULT_FMRS),
        help="FMRs of the EDC/ERC evaluation (default: 1e-1 1e-3; the small synthetic sets cannot resolve "
        "much below 1e-2)",
    )
    p.add_argument(
        "--identities",
        type=int,
        default=DEFAULT_IDENTITIES,
        metavar="N",
        help=f"synthetic training identities (default: {DEFAULT_IDENTITIES})",
    )
    p.add_argument(
        "--images-per-identity",
        type=int,
        default=12,
        metavar="N",
        help="mean images per identity (default: 12)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: configs/tiny_cpu.yaml)"
    )
    p.add_argument(
        "--cluster",
        type=Path,
        default=DEFAULT_CLUSTER,
        metavar="PROFILE",
        help="cluster profile (default: slurm/clusters/local.yaml)",
    )
    p.add_argument(
        "--nproc", type=int, default=2, metavar="N", help="processes when training here (default: 2)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, repeatable, e.g. --set loss.mode=cr",
    )
    p.set_defaults(func=run_demo)


# ----------------------------------------------------------------------------- stage bookkeeping


@dataclass
class StageRecord:
    """One stage's name, wall time and whether an earlier run's result was reused."""

    name: str
    seconds: float = 0.0
    reused: bool = False
    note: str = ""


@dataclass
class StageClock:
    """Numbered stage headers, per-stage timing and the timing table of the summary."""

    records: list[StageRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageRecord]:
        """Announce the stage, time it, and report how it ended (reused or done)."""
        record = StageRecord(name)
        self.records.append(record)
        number = f"[demo {len(self.records)}/{STAGE_COUNT}]"
        say(f"{number} {name}: {what}")
        start = time.monotonic()
        try:
            yield record
        except BaseException:
            say(f"{number} {name}: FAILED after {time.monotonic() - start:.1f} s")
            raise
        record.seconds = time.monotonic() - start
        outcome = "reused" if record.reused else "done"
        note = f" ({record.note})" if record.note else ""
        say(f"{number} {name}: {outcome} in {record.seconds:.1f} s{note}")

    def table(self) -> str:
        """Stage timings, one line each, and the total."""
        lines = [
            f"  {r.name:<10} {r.seconds:7.1f} s  {'reused' if r.reused else 'ran'}" for r in self.records
        ]
        lines.append(f"  {'total':<10} {time.monotonic() - self.started:7.1f} s")
        return "\n".join(lines)


def say(text: str) -> None:
    """A progress line of the demo (stdout, flushed so it interleaves with the job's log)."""
    print(text, flush=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when absent; a broken file is a clear error."""
    from jobs.cli import UserError

    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); remove it to redo that stage") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; remove it to redo that stage")
    return value


def _write_json(path: Path, value: dict[str, Any]) -> None:
    from data_prep.atomic import atomic_write_json

    atomic_write_json(path, value)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- data stages


@dataclass(frozen=True)
class DemoPaths:
    """Where every stage writes, all under --out (absolute: jobs run in other directories)."""

    out: Path

    @property
    def synth(self) -> Path:
        return self.out / "synth"

    @property
    def train(self) -> Path:
        return self.out / "train"

    @property
    def val(self) -> Path:
        return self.out / "val"

    @property
    def preview(self) -> Path:
        return self.out / PREVIEW_NAME

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"


def stage_synth(paths: DemoPaths, args: argparse.Namespace, record: StageRecord) -> None:
    """Write the synthetic dataset unless an identical one is there; a different one is an error."""
    from data_prep.synth import synthesize
    from jobs.cli import UserError

    wanted = {
        "identities": args.identities,
        "images_per_identity": args.images_per_identity,
        "seed": args.seed,
    }
    existing = _read_json(paths.synth / "synth.json")
    if existing is not None:
        differing = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
        if differing:
            listed = ", ".join(f"{k} {old} (asked {new})" for k, (old, new) in differing.items())
            raise UserError(
                f"{paths.synth} was synthesized with other settings: {listed}; "
                f"use another --out or remove {paths.out}"
            )
        record.reused, record.note = True, "synth.json exists"
        return
    if (paths.train / "dataset.json").exists():
        raise UserError(
            f"{paths.train} holds a converted dataset but {paths.synth}/synth.json is missing: "
            f"the demo folder is from something else; use another --out or remove {paths.out}"
        )
    started = time.monotonic()
    result = synthesize(
        paths.synth,
        identities=args.identities,
        images_per_identity=args.images_per_identity,
        seed=args.seed,
        progress=True,
    )
    record.note = f"{result.num_images} images of {result.num_identities} identities"
    _log_prep_run(
        "synth",
        paths,
        params={"out": paths.synth, **wanted},
        tags={},
        metrics={
            "images": float(result.num_images),
            "classes": float(result.num_identities),
            "seconds": time.monotonic() - started,
        },
    )


def stage_convert(paths: DemoPaths, record: StageRecord) -> None:
    """Convert train.rec into shards (data_prep.convert resumes a killed conversion by itself)."""
    from data_prep.convert import convert

    if (paths.train / "dataset.json").is_file():
        record.reused, record.note = True, "dataset.json exists"
        return
    from pipeline.tracking.lineage import lineage_tags, stage_metrics

    started = time.monotonic()
    info = convert(paths.synth, paths.train, progress=True)
    record.note = f"{info.num_images} images, {info.num_classes} classes, {len(info.shards)} shard(s)"
    _log_prep_run(
        "convert",
        paths,
        params={"source": paths.synth, "out": paths.train},
        tags=lineage_tags([info], per_set=False),
        metrics=stage_metrics([info], time.monotonic() - started),
    )


def stage_bins(paths: DemoPaths, record: StageRecord) -> None:
    """Convert every verification .bin of the synthetic data that is not converted yet."""
    from data_prep.bins import convert_bins
    from jobs.cli import UserError

    bins = sorted(paths.synth.glob("*.bin"))
    if not bins:
        raise UserError(
            f"{paths.synth}: no verification .bin files; remove {paths.synth} to synthesize again"
        )
    todo = [b for b in bins if not (paths.val / b.stem / "dataset.json").is_file()]
    if not todo:
        record.reused, record.note = True, f"{', '.join(b.stem for b in bins)}: dataset.json exist"
        return
    from pipeline.tracking.lineage import lineage_tags, stage_metrics

    started = time.monotonic()
    infos = convert_bins(todo, paths.val, progress=True)
    record.note = ", ".join(f"{i.root.name} {i.num_images // 2} pairs" for i in infos)
    _log_prep_run(
        "bins",
        paths,
        params={"source": " ".join(str(b) for b in todo), "out": paths.val},
        tags=lineage_tags(infos, per_set=True),
        metrics=stage_metrics(infos, time.monotonic() - started),
    )


def _log_prep_run(
    stage: str, paths: DemoPaths, *, params: dict[str, Any], tags: dict[str, str], metrics: dict[str, float]
) -> None:
    """The data stage's lineage run in the demo's MLflow store, as `igfiqa prep STAGE` logs it."""
    from pipeline.tracking.lineage import log_stage_run

    log_stage_run(stage, params=params, tags=tags, metrics=metrics, tracking_uri=paths.tracking_uri)


def stage_preview(paths: DemoPaths, config: Any, record: StageRecord) -> None:
    """The augmentation grid through the training graph, with the training config's settings."""
    from pipeline.data.preview import write_preview

    if paths.preview.is_file() and paths.preview.stat().st_size > 0:
        record.reused, record.note = True, "the PNG exists"
        return
    write_preview(paths.train, paths.preview, config.data.augment)
    record.note = _shown(paths.preview)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainOutcome:
    """A completed training: where its checkpoint is and which MLflow run it logged to."""

    checkpoint: str
    mlflow_run_id: str
    global_step: int
    where: str  # how it ran: "on SLURM (job 87, 2 tasks, ...)", "here with 2 processes, not on SLURM because ..."

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "mlflow_run_id": self.mlflow_run_id,
            "global_step": self.global_step,
            "where": self.where,
        }


def demo_config(paths: DemoPaths, args: argparse.Namespace) -> Any:
    """The training config: --config with the demo's data, run dir and tracking URI, then --set."""
    from pipeline.config import load_config

    if not args.config.is_file():
        from jobs.cli import UserError

        raise UserError(f"{args.config}: no such config (the demo's default is {DEFAULT_CONFIG})")
    demo_overrides = [
        f"data.dataset={paths.train}",
        f"run.dir={paths.run}",
        f"run.tracking_uri={paths.tracking_uri}",
        f"optim.max_steps={args.steps}",
        "run.name=demo",
    ]
    return load_config(args.config, [*demo_overrides, *args.overrides])


def check_run_dir_matches(config: Any) -> None:
    """A run directory holding a checkpoint of another configuration is an error, not a resume."""
    from jobs.cli import UserError
    from pipeline.checkpoint import find_resume_checkpoint, load_checkpoint
    from pipeline.config import config_from_dict, flatten_config

    checkpoint = find_resume_checkpoint(config.run.dir)
    if checkpoint is None:
        return
    saved = flatten_config(config_from_dict(load_checkpoint(checkpoint)["config"]))
    wanted = flatten_config(config)
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        listed = ", ".join(f"{k} {saved.get(k)!r} (asked {wanted.get(k)!r})" for k in differing[:5])
        raise UserError(
            f"{checkpoint} was trained with another configuration: {listed}"
            f"{' …' if len(differing) > 5 else ''}; use another --out or remove {config.run.dir}"
        )


def completed_training(config: Any) -> TrainOutcome | None:
    """The outcome recorded by an earlier demo whose training completed, if its checkpoint is still there."""
    recorded = _read_json(Path(config.run.dir) / TRAIN_MARKER)
    if recorded is None or not Path(str(recorded.get("checkpoint", ""))).is_file():
        return None
    return TrainOutcome(
        checkpoint=str(recorded["checkpoint"]),
        mlflow_run_id=str(recorded.get("mlflow_run_id", "")),
        global_step=int(recorded.get("global_step", 0)),
        where=str(recorded.get("where", "")),
    )


def slurm_unavailable_reason(profile: Any) -> str | None:
    """Why no training job can run on the profile's cluster here, or None when it can."""
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
        result = subprocess.run(command, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"the SLURM controller did not answer sinfo within 15 s{root_note}"
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the SLURM controller does not answer (sinfo: {detail}){root_note}"
    usable_cpus = []
    states = []
    for line in result.stdout.splitlines():
        state, _, cpus = line.strip().partition(" ")
        states.append(state)
        if state.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing") and cpus.isdigit():
            usable_cpus.append(int(cpus))
    where = f"partition {profile.partition}" if profile.partition else "the cluster"
    if not usable_cpus:
        return f"no usable SLURM node in {where} (node states: {', '.join(states) or 'none'}){root_note}"
    needed = profile.tasks_per_node * profile.cpus_per_task
    if max(usable_cpus) < needed:
        return (
            f"the profile {profile.source} asks for {needed} CPUs per node, "
            f"the largest node of {where} has {max(usable_cpus)}"
        )
    return None


def _job_still_active(run_dir: Path) -> tuple[str, str, str] | None:
    """(job id, state, submitit folder) of the last demo's SLURM job when SLURM still runs it."""
    recorded = _read_json(run_dir / JOB_MARKER)
    if recorded is None or shutil.which("squeue") is None:
        return None
    job_id = str(recorded.get("job_id", ""))
    result = subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%T"],
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
    )
    state = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    if state in ACTIVE_STATES:
        return job_id, state, str(recorded.get("folder", ""))
    return None


def _pending_reason(job_id: str) -> str:
    result = subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%r"],
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
    )
    return result.stdout.strip() or "unknown"


def follow_until_done(submission: Any) -> str:
    """Print rank 0's log as it grows until the job ends (requeues included); its final state."""
    from jobs.submit_train import follow_job

    pending_since = time.monotonic()
    last_note = pending_since

    def explain_pending(state: str) -> None:
        nonlocal last_note
        now = time.monotonic()
        if state == "PENDING" and now - last_note >= PENDING_NOTE_EVERY_S:
            say(
                f"  job {submission.job_id} still pending after {now - pending_since:.0f} s "
                f"(reason: {_pending_reason(submission.job_id)}); other jobs may hold the cluster"
            )
            last_note = now

    return follow_job(submission, out=sys.stdout, poll_s=POLL_S, line_prefix="  | ", on_poll=explain_pending)


def submit_or_reason(config: Any, profile: Any) -> Any:
    """The `Submission` of the training job, or why sbatch refused it (a reason to train here)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from jobs.submit_train import submit_training

    try:
        return submit_training(config, profile)
    except (FailedJobError, FailedSubmissionError, OSError) as exc:  # sbatch failed or is missing
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the submission to SLURM failed ({first_line})"


def follow_training(submission: Any, config: Any, profile: Any) -> TrainOutcome:
    """Follow the submitted job's log until it ends; rank 0's result, or a clear error."""
    from jobs.cli import UserError

    _write_json(
        Path(config.run.dir) / JOB_MARKER, {"job_id": submission.job_id, "folder": str(submission.folder)}
    )
    say(
        f"  submitted SLURM job {submission.job_id}: {submission.world_size} tasks on {submission.nodes} "
        f"node(s) of cluster profile {profile.name}; MLflow run {submission.mlflow_run_id}"
    )
    say(f"  following {_shown(submission.stdout)} (and .err)")
    try:
        state = follow_until_done(submission)
    except KeyboardInterrupt:
        submission.job.cancel(check=False)
        say(f"  cancelled job {submission.job_id}; run the demo again to resume from its last checkpoint")
        raise
    if state != "COMPLETED":
        tail = ""
        if submission.stderr.is_file():
            tail = "\n".join(submission.stderr.read_text(errors="replace").splitlines()[-15:])
        raise UserError(
            f"training job {submission.job_id} ended {state}; its log: {submission.stderr}\n{tail}\n"
            f"run the demo again to resume from the last checkpoint in {config.run.dir}"
        )
    result = submission.job.results()[0]  # one dict per task; rank 0 knows the checkpoint
    where = (
        f"on SLURM (job {submission.job_id}, {submission.world_size} tasks, cluster profile {profile.name})"
    )
    return _outcome_from_result(result, where)


def train_here(config: Any, nproc: int, why: str) -> TrainOutcome:
    """launch_local with `nproc` processes (gloo), one core's worth of threads each."""
    from jobs.local_launch import launch_local
    from pipeline.config import validate_for_launch

    validate_for_launch(config, nproc)
    # one process per core, as the SLURM profile does with OMP_NUM_THREADS=1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    result = launch_local(config, nproc=nproc)
    if result["status"] != "completed":
        from jobs.cli import UserError

        raise UserError(
            f"training stopped at step {result['global_step']} ({result['status']}); "
            f"run the demo again to resume from {result['checkpoint']}"
        )
    processes = f"{nproc} process{'es' if nproc > 1 else ''}"
    return _outcome_from_result(result, f"here with {processes}, not on SLURM because {why}")


def _outcome_from_result(result: dict[str, Any], where: str) -> TrainOutcome:
    return TrainOutcome(
        checkpoint=str(result["checkpoint"]),
        mlflow_run_id=str(result["mlflow_run_id"]),
        global_step=int(result["global_step"]),
        where=where,
    )


def stage_train(config: Any, args: argparse.Namespace, record: StageRecord) -> TrainOutcome:
    """Reuse a completed training, else train on SLURM (or here, saying why) and record the outcome."""
    from jobs.cli import UserError
    from jobs.cluster import load_profile

    run_dir = Path(config.run.dir)
    check_run_dir_matches(config)
    done = completed_training(config)
    if done is not None:
        record.reused, record.note = True, f"step {done.global_step}, trained {done.where}"
        return done
    active = _job_still_active(run_dir)
    if active is not None:
        job_id, state, folder = active
        raise UserError(
            f"SLURM job {job_id} of an earlier demo is still {state} in {run_dir}: follow it with "
            f"`igfiqa jobs logs {job_id} --folder {folder}` or cancel it with `igfiqa jobs cancel {job_id}`, "
            "then run the demo again"
        )
    if args.nproc < 1:
        raise UserError("--nproc must be >= 1")

    why_here = "--local was given" if args.local else None
    profile = None
    if why_here is None:
        profile = load_profile(args.cluster)
        why_here = slurm_unavailable_reason(profile)
    outcome = None
    if why_here is None and profile is not None:
        submitted = submit_or_reason(config, profile)
        if isinstance(submitted, str):
            why_here = submitted
        else:
            outcome = follow_training(submitted, config, profile)
    if outcome is None:
        say(f"  training HERE, not on SLURM, because {why_here}")
        outcome = train_here(config, args.nproc, str(why_here))
    _write_json(run_dir / TRAIN_MARKER, outcome.as_dict())
    record.note = f"step {outcome.global_step}, {outcome.where}"
    return outcome


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalSummary:
    """What the summary shows of the evaluation."""

    table_md: Path
    pngs: list[Path]
    mlflow_run_id: str


def stage_evaluate(
    paths: DemoPaths, config: Any, trained: TrainOutcome, fmrs: list[float], record: StageRecord
) -> EvalSummary:
    """Evaluate the final checkpoint on the verification sets and log it as a child MLflow run."""
    from jobs.commands.evaluate import log_evaluation
    from pipeline.evaluation.evaluate import evaluate_checkpoint
    from pipeline.method.model import load_inference_model
    from pipeline.parallel.env import resolve_device

    recorded = _read_json(paths.eval / EVAL_MARKER)
    table_md = paths.eval / "table.md"
    if (
        recorded is not None
        and recorded.get("checkpoint") == trained.checkpoint
        and recorded.get("global_step") == trained.global_step
        and recorded.get("fmr") == fmrs
        and table_md.is_file()
    ):
        record.reused, record.note = True, f"checkpoint of step {trained.global_step} already evaluated"
        pngs = [Path(p) for p in recorded.get("pngs", []) if Path(p).is_file()]
        return EvalSummary(table_md, pngs, str(recorded.get("mlflow_run_id", "")))

    device = resolve_device("auto")
    checkpoint = Path(trained.checkpoint)
    model, _ = load_inference_model(checkpoint, device)
    outcome = evaluate_checkpoint(
        model,
        paths.val,
        paths.eval,
        method="IG-FIQA",
        device=device,
        fmrs=fmrs,
        metadata={
            "checkpoint": str(checkpoint),
            "global_step": trained.global_step,
            "train_run_id": trained.mlflow_run_id,
        },
        progress=True,
    )
    # The same MLflow record as `igfiqa eval CHECKPOINT --data VAL` makes: an "eval" run whose parent
    # is the training run, with the same params, metrics and artifacts.
    eval_args = argparse.Namespace(
        tracking_uri=config.run.tracking_uri,
        checkpoint=checkpoint,
        data=paths.val,
        fr_model=None,
        fr_embeddings=None,
        flip=False,
        fmr=fmrs,
        discard_limit=0.2,
    )
    run_id = log_evaluation(
        outcome, args=eval_args, config=config, train_run_id=trained.mlflow_run_id, step=trained.global_step
    )
    pngs = list(outcome.files.pngs)
    _write_json(
        paths.eval / EVAL_MARKER,
        {
            "checkpoint": trained.checkpoint,
            "global_step": trained.global_step,
            "fmr": fmrs,
            "mlflow_run_id": run_id or "",
            "pngs": [str(p) for p in pngs],
        },
    )
    record.note = f"{len(outcome.sets)} verification sets, MLflow run {run_id}"
    return EvalSummary(outcome.files.table_md, pngs, run_id or "")


# ----------------------------------------------------------------------------- summary


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that shows the demo's runs (the venv's mlflow when it is not on PATH)."""
    executable = "mlflow"
    if shutil.which("mlflow") is None:
        beside_python = Path(sys.executable).parent / "mlflow"
        if beside_python.exists():
            executable = _shown(beside_python)
    return f"{executable} ui --backend-store-uri {tracking_uri}"


def summary_text(
    paths: DemoPaths, config: Any, trained: TrainOutcome, evaluated: EvalSummary, clock: StageClock
) -> str:
    """Where to look: the MLflow UI, the PNGs, the table, the stage timings."""
    plots = Path(config.run.dir) / "plots"
    epoch_histograms = sorted(plots.glob("weights-epoch-*.png"))
    pictures = [
        ("augmentation grid", [paths.preview]),
        ("EDC/ERC curves", evaluated.pngs),
        ("weight histogram", [plots / "class_weights.png"]),
        ("  per epoch", epoch_histograms),
        ("training curves", [plots / "training_curves.png"]),
    ]
    lines = [
        "",
        "=" * 78,
        f"IG-FIQA demo finished: trained {trained.global_step} steps {trained.where}",
        "=" * 78,
        f"results ({_shown(evaluated.table_md)}):",
        "",
        evaluated.table_md.read_text().rstrip(),
        "",
        "look at:",
        f"  MLflow UI          {mlflow_ui_command(paths.tracking_uri)}",
        f"                     then open http://127.0.0.1:5000, experiment {config.run.experiment!r}: "
        f"training run {trained.mlflow_run_id}",
        f"                     with its eval child run {evaluated.mlflow_run_id or '(not logged)'}",
    ]
    for label, files in pictures:
        present = [_shown(f) for f in files if f.is_file()]
        if present:
            lines.append(f"  {label:<18} {present[0]}")
            lines += [f"  {'':<18} {p}" for p in present[1:]]
    lines += [
        f"  checkpoint         {_shown(Path(trained.checkpoint))}",
        f"  everything         {_shown(paths.out)}/ (run again: finished stages are reused)",
        "",
        "wall time by stage:",
        clock.table(),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def run_demo(args: argparse.Namespace) -> int:
    """Handler of `igfiqa demo`."""
    from jobs.cli import UserError

    if args.steps < 0 or args.identities < 2 or args.images_per_identity < 1:
        raise UserError("--steps must be >= 0, --identities >= 2 and --images-per-identity >= 1")
    if not all(0.0 < f < 1.0 for f in args.fmr):
        raise UserError(f"--fmr values must lie in (0, 1), got {args.fmr}")
    paths = DemoPaths(args.out.resolve())
    if paths.out.exists() and not paths.out.is_dir():
        raise UserError(f"--out {paths.out} exists and is not a folder")
    paths.out.mkdir(parents=True, exist_ok=True)
    config = demo_config(paths, args)
    clock = StageClock()
    say(f"IG-FIQA demo in {_shown(paths.out)} (config {_shown(args.config.resolve())})")

    what = f"{args.identities} identities × ~{args.images_per_identity} images + clean/mixed .bin sets"
    with clock.stage("synth", f"{what} → {_shown(paths.synth)}") as record:
        stage_synth(paths, args, record)
    with clock.stage("convert", f"training set → DALI shards in {_shown(paths.train)}") as record:
        stage_convert(paths, record)
    with clock.stage("bins", f"verification sets → {_shown(paths.val)}") as record:
        stage_bins(paths, record)
    with clock.stage("preview", f"augmentation grid → {_shown(paths.preview)}") as record:
        stage_preview(paths, config, record)
    steps = f"{args.steps} steps" if args.steps else "the config's epochs"
    with clock.stage("train", f"{config.model.backbone}, loss {config.loss.mode}, {steps}") as record:
        trained = stage_train(config, args, record)
    with clock.stage(
        "evaluate", f"step {trained.global_step} on {_shown(paths.val)} → {_shown(paths.eval)}"
    ) as record:
        evaluated = stage_evaluate(paths, config, trained, args.fmr, record)

    summary = summary_text(paths, config, trained, evaluated, clock)
    print(summary, flush=True)
    (paths.out / "SUMMARY.txt").write_text(summary + "\n")
    return 0
