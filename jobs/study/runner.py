"""Running a study: its data, sets and matchers made once; each run trained and measured here or on
SLURM; where every run stands.

`prepare` (under OUT's lock) makes what every run shares and records it in OUT/study.json: the
training data (the synthetic set, or the spec's converted dataset), the evaluation sets
(identity-labelled synthetic sets under OUT/sets/, the verification pair lists under
OUT/verification/, the spec's own folders) and the matchers (built by `build_matchers`, reused
when built before, or the spec's ONNX files). Then each run (`execute_run`) trains unless its
marker `runs/<run>/study-train.json` says it finished (an interrupted training resumes from its
last checkpoint) and is measured unless `runs/<run>/measurements.json` exists
(`jobs.study.measure`); a run that failed leaves `study-failed.json` with the error and is tried
again by the next `study run`.

Here (`run_local`): N worker processes take the runs in the spec's order, each run claimed by an
exclusive lock on `runs/<run>/.claim` that dies with its process, so a killed study resumes where
it stopped and two studies on one folder never train a run twice. On SLURM (`submit_runs`): one
array job, a `StudyTask` per run, its job id in `runs/<run>/study-job.json` so a later call does
not submit a run whose job still runs; a preempted or timed-out task saves, requeues and resumes.

Fault points (tests): `IGFIQA_STUDY_FAULT=<run>@step-<k>` kills the study's process group, as a
SIGKILL would, at the k-th training step of a local run; `<run>@measure` after its training,
before its measurement.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import submitit

from jobs.errors import UserError
from jobs.stages.work import WorkFolder, marker_name, read_json_object, write_json_atomically
from jobs.study.spec import StudyRun, StudySpec, check_inputs, load_study_spec, run_config

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
LABEL = "study"  # of the markers: runs/<run>/study-train.json, study-job.json
TRAIN_MARKER = marker_name(LABEL, "train")
JOB_MARKER = marker_name(LABEL, "job")
MEASUREMENT_FILE = "measurements.json"
FAILURE_FILE = "study-failed.json"
CLAIM_FILE = ".claim"
FAULT_ENV = "IGFIQA_STUDY_FAULT"
STATES = ("pending", "training", "trained", "measured", "failed")


class StudyFolder(WorkFolder):
    """OUT of a study: the demo's layout (synth/, train/, mlflow.db) plus sets/, verification/,
    matchers/ (when the spec names no other folder), runs/<run>/ and report/."""

    @property
    def sets(self) -> Path:
        return self.out / "sets"

    @property
    def sets_source(self) -> Path:
        return self.out / "sets-source"

    @property
    def verification(self) -> Path:
        return self.out / "verification"

    @property
    def matchers(self) -> Path:
        return self.out / "matchers"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def report(self) -> Path:
        return self.out / "report"

    def run_dir(self, run: StudyRun) -> Path:
        return self.runs / run.name


@dataclass(frozen=True)
class Prepared:
    """What every run of the study shares (OUT/study.json)."""

    train: str  # the converted training set
    synth: str  # its synthetic source with ground truth ("" for a user's dataset)
    eval_folders: tuple[str, ...]  # folders of converted evaluation sets
    matchers: tuple[str, ...]  # ONNX files
    fr_bgr: bool = False

    @classmethod
    def read(cls, paths: StudyFolder) -> Prepared:
        recorded = read_json_object(paths.out / STUDY_FILE)
        if recorded is None:
            raise UserError(f"{paths.out / STUDY_FILE}: missing; run `igfiqa study run` first")
        return cls(
            train=recorded["train"],
            synth=recorded["synth"],
            eval_folders=tuple(recorded["eval_folders"]),
            matchers=tuple(recorded["matchers"]),
            fr_bgr=bool(recorded.get("fr_bgr", False)),
        )


def study_folder(spec: StudySpec) -> StudyFolder:
    return StudyFolder(Path(spec.out))


@contextlib.contextmanager
def _locked(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (released when the process ends, even killed); yields whether held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- preparing


def prepare(spec: StudySpec, *, cluster: Path | None, say: Callable[[str], None] = print) -> Prepared:
    """Make (or reuse) the training data, evaluation sets and matchers; record them in OUT/study.json."""
    import mlflow

    from data_prep.dataset import load_dataset_info
    from jobs.stages.data import (
        IdentitySetSpec,
        SynthSpec,
        prepare_identity_set,
        prepare_training_set,
    )
    from jobs.stages.matcher_spec import load_matchers_spec
    from jobs.stages.matchers import MatcherLaunch, build_matchers
    from pipeline.evaluation.efficacy import make_fresh_sets

    check_inputs(spec)
    paths = study_folder(spec)
    with _locked(paths.out / ".study.lock"):
        data = spec.training_data
        if data.synthetic is not None:
            s = data.synthetic
            synth = SynthSpec(
                identities=s.identities,
                images_per_identity=s.images_per_identity,
                low_variance_fraction=s.low_variance_fraction,
                seed=s.seed,
            )
            prepare_training_set(paths, synth, say, "training data, ")
            train, synth_dir = paths.train, str(paths.synth)
        else:
            train, synth_dir = Path(data.dataset), ""
            load_dataset_info(train)  # a DataError naming the folder when it is not a converted set
        folders: list[str] = []
        e = spec.evaluation
        for iset in e.identity_sets:
            prepare_identity_set(
                paths.sets_source / iset.name,
                paths.sets / iset.name,
                IdentitySetSpec(
                    identities=iset.identities, images_per_identity=iset.images_per_identity, seed=iset.seed
                ),
                tracking_uri=paths.tracking_uri,
            )
            say(
                f"  evaluation set {iset.name}: {iset.identities} identities x {iset.images_per_identity} images, seed {iset.seed}"
            )
        if e.identity_sets:
            folders.append(str(paths.sets))
        if e.verification.pairs:
            v = e.verification
            fresh = make_fresh_sets(
                paths.verification, v.seed, pairs=v.pairs, identities=v.identities, progress=True
            )
            folders.append(str(fresh.val))
            say(f"  verification sets clean, mixed: {v.pairs} pairs each, seed {v.seed}")
        folders += list(e.data)
        m = spec.matchers
        if m.spec:
            out = Path(m.out) if m.out else paths.matchers
            records = build_matchers(
                load_matchers_spec(m.spec),
                out,
                only=list(m.use) or None,
                launch=MatcherLaunch(nproc=1, cluster=cluster),
                say=say,
            )
            matchers = [str(r.onnx_path(out.resolve())) for r in records]
        else:
            matchers = list(m.onnx)
        mlflow.MlflowClient(paths.tracking_uri).search_experiments(max_results=1)  # create the store once
        prepared = Prepared(str(train), synth_dir, tuple(folders), tuple(matchers), m.bgr)
        write_json_atomically(paths.out / STUDY_FILE, {"spec": spec.source, **asdict(prepared)})
    return prepared


# ----------------------------------------------------------------------------- one run


def _fault(run: StudyRun) -> str:
    """This run's fault point from IGFIQA_STUDY_FAULT ("" when none)."""
    name, _, point = os.environ.get(FAULT_ENV, "").partition("@")
    return point if name == run.name else ""


def _die(run: StudyRun, point: str) -> None:
    log.warning("fault point %s@%s: killing the study's process group", run.name, point)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def training_config(spec: StudySpec, prepared: Prepared, run: StudyRun) -> Any:
    paths = study_folder(spec)
    return run_config(
        spec, run, train=Path(prepared.train), run_dir=paths.run_dir(run), tracking_uri=paths.tracking_uri
    )


def train_here(spec: StudySpec, prepared: Prepared, run: StudyRun) -> Any:
    """Train the run in this process (resuming its last checkpoint) unless it finished; its outcome."""
    from jobs.launch import check_local_launch, resumed_run_id
    from jobs.signals import StopSignals
    from jobs.stages.train import TrainOutcome, completed_training
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    config = training_config(spec, prepared, run)
    done = completed_training(config, LABEL)
    if done is not None:
        return done
    resumed_run_id(config)  # a run folder of other settings is an error, not a resume
    check_local_launch(config, 1)
    fault = _fault(run)
    kill_at = int(fault.removeprefix("step-")) if fault.startswith("step-") else 0
    signals, polls = StopSignals(catch_interrupt=True), [0]

    def stop_requested() -> int:
        polls[0] += 1
        if polls[0] == kill_at:
            _die(run, fault)
        return signals.code()

    started = time.monotonic()
    result = train(config, DistEnv.single(), stop_requested=stop_requested).as_dict()
    if result["status"] != "completed":
        raise UserError(f"{run.name}: training stopped at step {result['global_step']} ({result['status']})")
    outcome = TrainOutcome.from_result(
        result, "here, one process (igfiqa study run --local)", time.monotonic() - started
    )
    write_json_atomically(Path(config.run.dir) / TRAIN_MARKER, outcome.as_dict())
    return outcome


def measure(spec: StudySpec, prepared: Prepared, run: StudyRun, outcome: Any, *, track: bool = True) -> dict:
    """The run's measurements (`jobs.study.measure`), written to runs/<run>/measurements.json."""
    from jobs.study.measure import evaluate_run, ground_truth_figures, load_training_truth
    from pipeline.evaluation.options import EvalOptions

    if _fault(run) == "measure":
        _die(run, "measure")
    paths = study_folder(spec)
    run_dir = paths.run_dir(run)
    e = spec.evaluation
    options = EvalOptions(
        fmrs=e.fmrs,
        discard_limit=e.discard_limit,
        fr_models=tuple(Path(p) for p in prepared.matchers),
        fr_bgr=prepared.fr_bgr,
        own_backbone=True,
        nonmated_sample_cap=e.nonmated_cap,
        nonmated_sample_seed=e.nonmated_seed,
        batch_size=e.batch_size,
        device=e.device,
        progress=False,
    )
    # the spec's ground truth belongs to its own folders (`evaluation.data`); the study's synthetic
    # sets carry theirs in their folders
    with_truth = replace(options, ground_truth=Path(e.ground_truth)) if e.ground_truth else options
    folders = [(Path(f), with_truth if f in e.data else options) for f in prepared.eval_folders]
    started = time.monotonic()
    checkpoint = Path(outcome.checkpoint)
    figures = evaluate_run(checkpoint, folders, run_dir / "eval", track=track)
    measured = {
        "run": run.name,
        "arm": run.arm,
        "seed": run.seed,
        "checkpoint": str(checkpoint),
        "global_step": outcome.global_step,
        "mlflow_run_id": outcome.mlflow_run_id,
        "train_seconds": outcome.seconds,
        **figures,
    }
    if prepared.synth and spec.launch.measure_ground_truth:
        truth = load_training_truth(Path(prepared.train), Path(prepared.synth))
        measured["ground_truth"] = ground_truth_figures(checkpoint, truth)
    measured["measure_seconds"] = time.monotonic() - started
    write_json_atomically(run_dir / MEASUREMENT_FILE, measured)
    return measured


def execute_run(spec: StudySpec, prepared: Prepared, run: StudyRun) -> None:
    """Train (unless finished) and measure (unless measured) one run here; a failure is recorded in
    runs/<run>/study-failed.json and raised."""
    run_dir = study_folder(spec).run_dir(run)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    try:
        outcome = train_here(spec, prepared, run)
        if not (run_dir / MEASUREMENT_FILE).is_file():
            measure(spec, prepared, run, outcome)
    except Exception as exc:
        write_json_atomically(
            run_dir / FAILURE_FILE,
            {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]},
        )
        raise


# ----------------------------------------------------------------------------- here


def _worker(spec_path: str, index: int, threads: int) -> None:
    """One local worker: claim the next run nobody holds, train and measure it; until none is left."""
    import torch

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s w{index} %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(threads)
    spec = load_study_spec(spec_path)
    prepared = Prepared.read(study_folder(spec))
    paths = study_folder(spec)
    failed = []
    for run in spec.runs():
        if (paths.run_dir(run) / MEASUREMENT_FILE).is_file():
            continue
        with _locked(paths.run_dir(run) / CLAIM_FILE, blocking=False) as held:
            if not held or (paths.run_dir(run) / MEASUREMENT_FILE).is_file():
                continue
            log.info("%s: started by worker %d", run.name, index)
            try:
                execute_run(spec, prepared, run)
            except Exception:
                log.exception("%s failed (recorded in %s)", run.name, paths.run_dir(run) / FAILURE_FILE)
                failed.append(run.name)
                continue
            log.info("%s: measured", run.name)
    if failed:
        raise SystemExit(f"worker {index}: runs failed: {', '.join(failed)}")


def run_local(spec: StudySpec, *, workers: int, say: Callable[[str], None] = print) -> list[int]:
    """Train and measure every unfinished run with `workers` local processes (one thread each by
    `launch.task_cpus`); their exit codes."""
    import multiprocessing

    if workers < 1:
        raise UserError(f"--workers {workers}: need at least one")
    os.environ["OMP_NUM_THREADS"] = str(spec.launch.task_cpus)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker, args=(spec.source, i, spec.launch.task_cpus), name=f"study-worker-{i}"
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    say(f"  {workers} local worker(s) started (pids {', '.join(str(p.pid) for p in processes)})")
    for process in processes:
        process.join()
    return [int(p.exitcode or 0) for p in processes]


# ----------------------------------------------------------------------------- on SLURM


@dataclass
class StudyTask:
    """The picklable SLURM task of one run: train (one process, or DDP over the task's ranks), then
    measure on rank 0. `checkpoint()` requeues the same task, which resumes the training."""

    spec_path: str
    run_name: str
    collective_timeout_s: float = 900.0

    def __call__(self) -> dict[str, Any]:
        from jobs.stages.train import TrainOutcome, completed_training
        from jobs.train_job import TrainJob

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        spec = load_study_spec(self.spec_path)
        prepared = Prepared.read(study_folder(spec))
        run = spec.run(self.run_name)
        config = training_config(spec, prepared, run)
        run_dir = Path(config.run.dir)
        outcome = completed_training(config, LABEL)
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        try:
            if outcome is None:
                started = time.monotonic()
                result = TrainJob(config, "", self.collective_timeout_s)()
                if rank != 0:
                    return {"run": run.name, "rank": rank}
                job = submitit.JobEnvironment()
                outcome = TrainOutcome.from_result(
                    result,
                    f"on SLURM (job {job.job_id}, {job.num_tasks} task(s))",
                    time.monotonic() - started,
                )
                write_json_atomically(run_dir / TRAIN_MARKER, outcome.as_dict())
            if rank == 0 and not (run_dir / MEASUREMENT_FILE).is_file():
                measure(spec, prepared, run, outcome)
        except Exception as exc:
            if rank == 0:
                write_json_atomically(
                    run_dir / FAILURE_FILE,
                    {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]},
                )
            raise
        return {"run": run.name, "rank": rank}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(
            StudyTask(self.spec_path, self.run_name, self.collective_timeout_s)
        )


def submit_runs(
    spec: StudySpec, runs: list[StudyRun], cluster: Path, say: Callable[[str], None] = print
) -> Any:
    """One SLURM array of a `StudyTask` per run on the cluster profile `cluster`; the `ArrayJob`."""
    from jobs.array_job import submit_array
    from jobs.cluster import load_profile

    profile = load_profile(cluster)
    paths = study_folder(spec)
    for run in runs:
        paths.run_dir(run).mkdir(parents=True, exist_ok=True)
        (paths.run_dir(run) / FAILURE_FILE).unlink(missing_ok=True)
    folder = paths.out / "submitit" / time.strftime("%Y%m%d-%H%M%S")
    gpus = profile.gpus_per_node if not spec.launch.single_process else 0
    array = submit_array(
        [StudyTask(spec.source, run.name, profile.collective_timeout_s) for run in runs],
        profile=profile,
        folder=folder,
        job_name=f"study-{spec.name}",
        what="study runs",
        finalize=lambda results: results,
        unfinished=f"run `igfiqa study run {spec.source}` again to resume (finished runs are reused)",
        labels=[run.name for run in runs],
        single_process=spec.launch.single_process,
        task_cpus=spec.launch.task_cpus,
        task_gpus=min(gpus, 1) if spec.launch.single_process else 0,
    )
    for run, job in zip(runs, array.jobs, strict=True):
        write_json_atomically(
            paths.run_dir(run) / JOB_MARKER, {"job_id": str(job.job_id), "folder": str(folder)}
        )
    say(
        f"  submitted array job {array.array_id}: {len(runs)} run(s) on cluster profile {profile.name} (logs: {folder})"
    )
    return array


# ----------------------------------------------------------------------------- status


@dataclass(frozen=True)
class RunStatus:
    """Where one run stands."""

    run: str
    arm: str
    seed: int
    state: str  # one of STATES
    step: int  # the last checkpoint's (or the finished training's) global step
    detail: str = ""
    held: bool = False  # a local worker or a SLURM job holds it now

    @property
    def to_do(self) -> bool:
        """Whether a `study run` should start it: not measured, and nothing holds it."""
        return self.state != "measured" and not self.held


def _last_step(run_dir: Path) -> int:
    steps = [
        int(p.stem.split("-")[1])
        for p in (run_dir / "checkpoints").glob("step-*.ckpt")
        if p.stem.split("-")[1].isdigit()
    ]
    return max(steps, default=0)


def run_status(spec: StudySpec, run: StudyRun, *, ask_slurm: bool = True) -> RunStatus:
    """The state of one run: measured, trained, training (a local worker or a SLURM job holds it),
    failed (its last attempt raised), or pending (nothing holds it; it resumes from `step`)."""
    from jobs.stages.train import active_job

    run_dir = study_folder(spec).run_dir(run)
    trained = read_json_object(run_dir / TRAIN_MARKER)
    step = int(trained["global_step"]) if trained else _last_step(run_dir)
    if (run_dir / MEASUREMENT_FILE).is_file():
        return RunStatus(run.name, run.arm, run.seed, "measured", step)
    held_here = False
    if (run_dir / CLAIM_FILE).is_file():
        with _locked(run_dir / CLAIM_FILE, blocking=False) as free:
            held_here = not free
    active = active_job(run_dir, LABEL) if ask_slurm and (run_dir / JOB_MARKER).is_file() else None
    if held_here or active is not None:
        detail = f"SLURM job {active.job_id} {active.state}" if active is not None else "a local worker"
        return RunStatus(
            run.name, run.arm, run.seed, "trained" if trained else "training", step, detail, True
        )
    failure = read_json_object(run_dir / FAILURE_FILE)
    if failure is not None:
        return RunStatus(run.name, run.arm, run.seed, "failed", step, str(failure.get("error", ""))[:200])
    if trained:
        return RunStatus(run.name, run.arm, run.seed, "trained", step, "not measured yet")
    return RunStatus(run.name, run.arm, run.seed, "pending", step, f"resumes at step {step}" if step else "")


def study_status(spec: StudySpec, *, ask_slurm: bool = True) -> list[RunStatus]:
    return [run_status(spec, run, ask_slurm=ask_slurm) for run in spec.runs()]


def status_table(statuses: list[RunStatus]) -> str:
    """The statuses as an aligned text table, then a count per state."""
    header = ("run", "arm", "seed", "state", "step", "")
    rows = [(s.run, s.arm, str(s.seed), s.state, str(s.step), s.detail) for s in statuses]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n) + f" of {len(statuses)} runs")
    return "\n".join(lines)


def active_runs(spec: StudySpec) -> list[StudyRun]:
    """The runs a SLURM job of an earlier call still holds."""
    from jobs.stages.train import active_job

    paths = study_folder(spec)
    return [
        run
        for run in spec.runs()
        if (paths.run_dir(run) / JOB_MARKER).is_file() and active_job(paths.run_dir(run), LABEL) is not None
    ]


def wait_for_runs(
    spec: StudySpec, runs: list[StudyRun], *, say: Callable[[str], None] = print, poll_s: float = 15.0
) -> None:
    """Wait until SLURM holds none of `runs` any more (their jobs were submitted by an earlier call)."""
    from jobs.stages.train import active_job

    paths = study_folder(spec)
    waiting = list(runs)
    if waiting:
        say(f"  waiting for {len(waiting)} run(s) submitted before: {', '.join(r.name for r in waiting)}")
    while waiting:
        time.sleep(poll_s)
        waiting = [r for r in waiting if active_job(paths.run_dir(r), LABEL) is not None]
