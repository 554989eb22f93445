"""Training on the real local SLURM cluster: a 2-task DDP job completes and logs to MLflow; a
preempted, a timed-out and an externally requeued job each resume into the same MLflow run and
end bit-identical to an uninterrupted job; every invalid config is refused before submission.

All runs use one tiny dataset (tests/train_fixtures.py: 15 steps per epoch at 8 + 8 images) and
one of two configs, each with its uninterrupted baseline run:
- SHORT (45 steps): the `igfiqa submit --wait` run and the `submit_training` run (module
  fixtures), the former the baseline of the preemption and the `scontrol requeue` tests, which
  interrupt their job after its first periodic checkpoint.
- LONG (375 steps, ~75 s of training at ~0.2 s/step on 2 quiet cores, so one 1-minute attempt
  can never finish it): the timeout test's job, which must still be training when SLURM's
  time-limit warning comes, and its own uninterrupted baseline. (A plan that a quiet machine
  finishes before the warning would requeue nothing.) The two LONG
  runs take ~9 min together, so the test is marked `long`: `make test` runs it, CI (.ci/run)
  leaves it out to stay within its 40 minutes.

Time-limit warnings on this cluster (measured): slurmctld looks at time limits every 30 s and
sends `--signal=USR2@S` at the first look where `now + S + 30 s >= end`. With a 1-minute limit
and S = 30 s the warning came 1–13 s after each start, before training had begun, and the
requeued attempts (14–19 s apart) never got further: 6 requeues, 2 steps, FAILED. With S = 10 s
it comes 20–50 s after the start, and after a requeue ~40 s into the next attempt.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.launch import Submission, submit_training
from pipeline.config import TrainConfig, dump_config, load_config
from tests.train_fixtures import tiny_config, tiny_dataset

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
LOCAL_PROFILE = REPO / "slurm" / "clusters" / "local.yaml"
STEPS_PER_EPOCH = 15  # 240 images / (8 + 8) per step
LOG_EVERY = 2
JOB_TIMEOUT_S = 900.0  # generous: other engineers' jobs may hold the 2-core cluster
IGFIQA_SUBMIT = (sys.executable, "-m", "jobs.cli", "submit")
SACCT = ("sacct", "--noheader", "--allocations")


@dataclass(frozen=True)
class Plan:
    """Length and checkpoint interval of one of the two configs."""

    epochs: int
    milestone: int
    checkpoint_every: int

    @property
    def total_steps(self) -> int:
        return self.epochs * STEPS_PER_EPOCH


SHORT = Plan(epochs=3, milestone=2, checkpoint_every=5)
LONG = Plan(epochs=25, milestone=12, checkpoint_every=10)


# --------------------------------------------------------------------------- helpers


def _config(dataset: Path, root: Path, name: str, plan: Plan) -> TrainConfig:
    """The plan's config, writing its run and MLflow store under `root`."""
    return tiny_config(
        dataset,
        root / "run",
        f"sqlite:///{root / 'mlflow.db'}",
        optim={"epochs": plan.epochs, "milestones": [plan.milestone]},
        run={"name": name, "checkpoint_every_steps": plan.checkpoint_every, "log_every": LOG_EVERY},
    )


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _log(stderr: Path) -> str:
    """Rank 0's stderr, all attempts (submitit opens logs in append mode)."""
    return stderr.read_text(errors="replace") if stderr.exists() else ""


def _results(submission: Submission) -> list[dict[str, Any]]:
    """Every task's result, waiting (requeues included) at most JOB_TIMEOUT_S."""
    job = submission.job
    _wait_until(job.done, JOB_TIMEOUT_S, f"job {submission.job_id} to finish", poll_s=1.0)
    try:
        return job.results()
    except Exception as exc:
        log = _log(submission.stderr)[-4000:]
        raise AssertionError(f"job {submission.job_id} failed; rank 0 log:\n{log}") from exc


def _sacct_attempts(job_id: str) -> list[str]:
    """The job allocation's state per attempt, oldest first (requeued attempts show REQUEUED)."""
    out = subprocess.run(
        [*SACCT, "--parsable2", "--duplicates", "--jobs", job_id, "--format=JobID,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split("|")[1] for line in out.splitlines() if line.split("|")[0] == job_id]


def _final_sacct_attempts(job_id: str) -> list[str]:
    """Attempts once accounting has recorded the end of the last one."""
    _wait_until(
        lambda: (
            (_sacct_attempts(job_id) or ["PENDING"])[-1]
            not in {"RUNNING", "PENDING", "REQUEUED", "COMPLETING"}
        ),
        120,
        f"sacct to record the end of job {job_id}",
        poll_s=1.0,
    )
    return _sacct_attempts(job_id)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.ckpt"))


def _final_state(config: TrainConfig) -> dict[str, Any]:
    from pipeline.checkpoint import find_resume_checkpoint, load_checkpoint

    path = find_resume_checkpoint(config.run.dir)
    assert path is not None, f"no checkpoint in {config.run.dir}"
    return load_checkpoint(path)


def _mlflow_client(config: TrainConfig) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config.run.tracking_uri)


def _metric_steps(client: Any, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric (a step logged twice across attempts keeps its last value)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _logged_steps(total: int) -> list[int]:
    """Steps the monitor logs metrics at: every LOG_EVERY steps, and the last step."""
    return sorted({*range(LOG_EVERY, total + 1, LOG_EVERY), total})


def _resumed_steps(log: str) -> list[int]:
    """Global steps the attempts in a rank-0 log resumed from."""
    return [int(m) for m in re.findall(r"resumed from .*global step (\d+)/", log)]


@dataclass(frozen=True)
class Baseline:
    """An uninterrupted 2-task run that interrupted runs of the same plan must reproduce."""

    plan: Plan
    config: TrainConfig
    job_id: str
    run_id: str
    stderr: Path
    state: dict[str, Any]  # the final checkpoint
    loss_arc: dict[int, float]


def _baseline(plan: Plan, config: TrainConfig, job_id: str, run_id: str, stderr: Path) -> Baseline:
    loss = _metric_steps(_mlflow_client(config), run_id, "loss_arc")
    return Baseline(plan, config, job_id, run_id, stderr, _final_state(config), loss)


def _assert_same_final_weights(state: dict[str, Any], baseline: Baseline) -> None:
    assert state["global_step"] == baseline.state["global_step"] == baseline.plan.total_steps
    expected = baseline.state["model"]
    assert state["model"].keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(state["model"][k], expected[k])]
    assert not differing, f"model tensors differ from the uninterrupted run: {differing[:5]}"
    for key in ("classifier", "variance"):
        assert torch.equal(state[key], baseline.state[key]), f"{key} differs from the uninterrupted run"


def _assert_resumed_into_same_run(
    submission: Submission, config: TrainConfig, results: list[dict[str, Any]], baseline: Baseline
) -> list[int]:
    """Checks shared by the interrupted jobs; returns the steps their attempts resumed from."""
    total = baseline.plan.total_steps
    assert results[0]["status"] == "completed" and results[0]["global_step"] == total
    assert results[0]["mlflow_run_id"] == submission.mlflow_run_id
    log = _log(submission.stderr)
    resumed = _resumed_steps(log)
    assert resumed and max(resumed) > 0, f"no attempt resumed from a checkpoint:\n{log[-3000:]}"

    attempts = _final_sacct_attempts(submission.job_id)
    assert "REQUEUED" in attempts[:-1], f"sacct shows no requeue of job {submission.job_id}: {attempts}"
    assert attempts[-1] == "COMPLETED", f"job {submission.job_id} ended {attempts}:\n{log[-3000:]}"

    client = _mlflow_client(config)
    run = client.get_run(submission.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm_job_id"] == submission.job_id
    prefix = "attempt_started_at_step_"
    started_at = sorted(int(k[len(prefix) :]) for k in run.data.tags if k.startswith(prefix))
    assert started_at[0] == 0 and set(resumed) <= set(started_at), (started_at, resumed)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run was opened
    # the one MLflow run holds the whole curve, and it ends where the uninterrupted run ends
    loss = _metric_steps(client, submission.mlflow_run_id, "loss_arc")
    assert sorted(loss) == _logged_steps(total)
    assert loss[total] == pytest.approx(baseline.loss_arc[total], rel=1e-6)

    _assert_same_final_weights(_final_state(config), baseline)
    return resumed


def _interrupt_after_first_checkpoint(submission: Submission, config: TrainConfig, plan: Plan) -> int:
    """Wait until the running job has saved a periodic checkpoint; the step of that checkpoint."""
    run_dir = Path(config.run.dir)
    _wait_until(lambda: bool(_checkpoint_steps(run_dir)), JOB_TIMEOUT_S, "a periodic checkpoint")
    saved = _checkpoint_steps(run_dir)[-1]
    assert saved <= plan.total_steps - 4 * plan.checkpoint_every, f"too late to interrupt (step {saved})"
    return saved


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@dataclass(frozen=True)
class CliRun:
    """`igfiqa submit --wait` of the SHORT config, and the baseline it leaves."""

    process: subprocess.CompletedProcess[str]
    baseline: Baseline


@pytest.fixture(scope="module")
def cli_run(slurm_cluster, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    root = tmp_path_factory.mktemp("cli-submit")
    config = _config(dataset, root, "cli-submit", SHORT)
    config_file = root / "tiny.yaml"
    config_file.write_text(dump_config(config))
    process = subprocess.run(
        [*IGFIQA_SUBMIT, str(config_file), "--cluster", str(LOCAL_PROFILE), "--wait"],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        cwd=root,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) \(2 tasks on 1 node\(s\)\)", process.stdout)
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) at (\S+)", process.stdout)
    stderr = re.search(r"stderr: (\S+)", process.stdout)
    assert job_id and run_id and stderr, process.stdout[:3000]
    baseline = _baseline(SHORT, config, job_id.group(1), run_id.group(1), Path(stderr.group(1)))
    return CliRun(process, baseline)


@dataclass(frozen=True)
class ApiRun:
    """`submit_training` of the LONG config, its tasks' results, and the baseline it leaves."""

    submission: Submission
    results: list[dict[str, Any]]
    baseline: Baseline


def _api_run(profile: Any, dataset: Path, root: Path, plan: Plan) -> ApiRun:
    """An uninterrupted `submit_training` run of `plan`, its tasks' results and its baseline."""
    root.mkdir(parents=True, exist_ok=True)
    config = _config(dataset, root, "api-submit", plan)
    submission = submit_training(config, profile)
    results = _results(submission)
    baseline = _baseline(plan, config, submission.job_id, submission.mlflow_run_id, submission.stderr)
    return ApiRun(submission, results, baseline)


@pytest.fixture(scope="module")
def api_run(slurm_cluster, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ApiRun:
    return _api_run(slurm_cluster.profile, dataset, tmp_path_factory.mktemp("api-submit"), SHORT)


# --------------------------------------------------------------------------- 1. a job completes


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_task_job_completes_with_its_mlflow_run(api_run: ApiRun) -> None:
    submission, results, baseline = api_run.submission, api_run.results, api_run.baseline
    config, total = baseline.config, SHORT.total_steps
    assert submission.world_size == 2 and submission.nodes == 1
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert [r["global_step"] for r in results] == [total, total]
    assert results[0]["checkpoint"] and results[1]["checkpoint"] == ""  # rank 0 writes checkpoints
    assert _final_sacct_attempts(submission.job_id) == ["COMPLETED"]
    assert _resumed_steps(_log(submission.stderr)) == []

    client = _mlflow_client(config)
    run = client.get_run(submission.mlflow_run_id)
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["slurm_job_id"] == submission.job_id
    assert tags["world_size"] == "2"
    assert tags["kind"] == "train" and tags["code_version"]
    assert tags["run_dir"] == config.run.dir
    assert params["model.backbone"] == "iresnet_mini"
    assert params["data.fr_batch"] == "8" and params["optim.epochs"] == str(SHORT.epochs)
    assert float(params["optim.lr"]) == config.optim.lr

    expected_steps = _logged_steps(total)
    for key in ("loss_arc", "loss_ig", "cr_mean", "class_weight_zero_frac", "alpha", "lr", "images_per_s"):
        history = client.get_metric_history(submission.mlflow_run_id, key)
        assert sorted(m.step for m in history) == expected_steps, key
        assert all(m.value == m.value for m in history), f"{key} has NaN"  # NaN != NaN
    lr = _metric_steps(client, submission.mlflow_run_id, "lr")
    assert lr[2] == pytest.approx(0.05) and lr[total] == pytest.approx(0.005)  # ÷10 at the milestone
    alpha = _metric_steps(client, submission.mlflow_run_id, "alpha")
    middle = LOG_EVERY * (total // (2 * LOG_EVERY))  # a logged step half-way
    assert alpha[2] < alpha[middle] < alpha[total] == pytest.approx(1.0)  # 0.9 → 1 over training
    assert results[0]["metrics"]["loss_arc"] == pytest.approx(baseline.loss_arc[total])

    artifacts = {a.path for a in client.list_artifacts(submission.mlflow_run_id)}
    assert {"config.yaml", "class_weights.png", "training_curves.png", "checkpoint.txt"} <= artifacts
    local = Path(client.download_artifacts(submission.mlflow_run_id, "checkpoint.txt"))
    checkpoint = Path(local.read_text().strip())
    assert checkpoint == Path(results[0]["checkpoint"]) and checkpoint.is_file()
    config_yaml = Path(client.download_artifacts(submission.mlflow_run_id, "config.yaml"))
    assert load_config(config_yaml) == config
    for png in ("training_curves.png", "class_weights.png"):
        data = Path(client.download_artifacts(submission.mlflow_run_id, png)).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cli_submit_wait_prints_the_job_and_exits_zero(cli_run: CliRun) -> None:
    out, baseline = cli_run.process.stdout, cli_run.baseline
    stdout_path = Path(re.search(r"stdout: (\S+)", out).group(1))
    assert stdout_path.is_file() and baseline.stderr.is_file()
    assert baseline.stderr.name == f"{baseline.job_id}_0_log.err"
    assert f"MLflow run {baseline.run_id} at {baseline.config.run.tracking_uri}" in out
    assert f"step {SHORT.total_steps}/{SHORT.total_steps}" in out  # --wait followed rank 0's log
    assert out.splitlines()[-1] == f"job {baseline.job_id}: COMPLETED"
    assert _final_sacct_attempts(baseline.job_id) == ["COMPLETED"]

    run = _mlflow_client(baseline.config).get_run(baseline.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm_job_id"] == baseline.job_id and run.data.tags["world_size"] == "2"
    assert baseline.state["global_step"] == SHORT.total_steps


# --------------------------------------------------------------------------- 2. interrupted jobs resume


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_preempted_job_resumes_into_the_same_run_and_weights(
    slurm_cluster, dataset: Path, tmp_path: Path, cli_run: CliRun
) -> None:
    config = _config(dataset, tmp_path, "preempted", SHORT)
    submission = submit_training(config, slurm_cluster.profile)
    _interrupt_after_first_checkpoint(submission, config, SHORT)
    submission.job._interrupt()  # what a preemption sends: SIGTERM, then USR2

    results = _results(submission)
    resumed = _assert_resumed_into_same_run(submission, config, results, cli_run.baseline)
    assert "this job is preempted" in _log(submission.stderr)
    tags = _mlflow_client(config).get_run(submission.mlflow_run_id).data.tags
    interrupted_at = int(tags["last_interruption_step"])
    assert 0 < interrupted_at < SHORT.total_steps and interrupted_at in resumed  # the signal's own save


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_scontrol_requeued_job_resumes_into_the_same_run_and_weights(
    slurm_cluster, dataset: Path, tmp_path: Path, cli_run: CliRun
) -> None:
    config = _config(dataset, tmp_path, "requeued", SHORT)
    submission = submit_training(config, slurm_cluster.profile)
    saved_before = _interrupt_after_first_checkpoint(submission, config, SHORT)
    # SIGTERM to the tasks, SIGKILL after KillWait: submitit's checkpoint() is never called
    subprocess.run(["scontrol", "requeue", submission.job_id], check=True, capture_output=True, text=True)

    results = _results(submission)
    resumed = _assert_resumed_into_same_run(submission, config, results, cli_run.baseline)
    assert max(resumed) >= saved_before
    assert "Caught signal SIGUSR2" not in _log(submission.stderr)  # no submitit handler was involved


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(2400)
def test_timed_out_job_requeues_and_resumes_into_the_same_run_and_weights(
    slurm_cluster, dataset: Path, tmp_path: Path
) -> None:
    baseline = _api_run(slurm_cluster.profile, dataset, tmp_path / "baseline", LONG).baseline
    # 1-minute limit, USR2 10 s before it (see the module docstring for why not 30 s); many more
    # requeues than the profile's 3: a loaded machine needs several ~25 s attempts for LONG
    profile = dataclasses.replace(slurm_cluster.profile, time_min=1, signal_delay_s=10, max_requeues=12)
    config = _config(dataset, tmp_path, "timed-out", LONG)
    submission = submit_training(config, profile)
    script = (submission.folder / f"{submission.job_id}_submission.sh").read_text()
    assert "#SBATCH --time=1\n" in script and "#SBATCH --signal=USR2@10\n" in script

    results = _results(submission)
    _assert_resumed_into_same_run(submission, config, results, baseline)
    assert "this job is timed-out" in _log(submission.stderr)


# --------------------------------------------------------------------------- 3. invalid configs


@pytest.fixture(scope="module")
def valid_config_file(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refused")
    path = root / "tiny.yaml"
    path.write_text(dump_config(_config(dataset, root, "refused", SHORT)))
    return path


def _no_dataset_json(tmp: Path) -> str:
    folder = tmp / "incomplete"
    folder.mkdir()
    (folder / "shard-00000.tar").write_bytes(b"")
    return f"data.dataset={folder}"


INVALID = {
    "wrong-type": (lambda tmp: "optim.lr=abc", r"optim\.lr: expected a number"),
    "out-of-range": (lambda tmp: "optim.lr=-1", r"optim\.lr: -1(\.0)? must be positive"),
    "missing-dataset": (
        lambda tmp: f"data.dataset={tmp / 'no-such-folder'}",
        r"data\.dataset: .*no-such-folder.*does not exist",
    ),
    "no-dataset-json": (_no_dataset_json, r"data\.dataset: .*incomplete.*no dataset\.json"),
    "class-count": (
        lambda tmp: "data.num_classes=41",
        r"data\.num_classes: 41 disagrees with the dataset .*\(40 classes\)",
    ),
    "batch-vs-world": (
        lambda tmp: "data.fr_batch=7",
        r"data\.fr_batch: 7 is not divisible by the world size 2",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_config_is_refused_before_submission(
    slurm_cluster, valid_config_file: Path, tmp_path: Path, case: str
) -> None:
    make_override, message = INVALID[case]
    job_name = f"refused-{case}-{uuid.uuid4().hex[:8]}"
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    command = [*IGFIQA_SUBMIT, str(valid_config_file), "--cluster", str(LOCAL_PROFILE), "--wait"]
    command += ["--set", f"run.name={job_name}", "--set", f"run.dir={run_dir}"]
    command += ["--tracking-uri", f"sqlite:///{db}", "--set", make_override(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("igfiqa: error: ")
    assert "Traceback" not in proc.stderr and "submitted job" not in proc.stdout
    assert not (run_dir / "submitit").exists() and not db.exists()  # no job, no MLflow run
    jobs = subprocess.run(
        [*SACCT, "--starttime", "now-1hours", "--name", job_name, "--format=JobID"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert jobs == []


def test_a_partition_sbatch_refuses_is_one_line_and_a_failed_run(
    slurm_cluster, valid_config_file: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    profile = tmp_path / "nope.yaml"
    profile.write_text(LOCAL_PROFILE.read_text().replace("partition: debug", "partition: no-such-partition"))
    db = tmp_path / "mlflow.db"
    command = [*IGFIQA_SUBMIT, str(valid_config_file), "--cluster", str(profile)]
    command += ["--set", f"run.dir={tmp_path / 'run'}", "--tracking-uri", f"sqlite:///{db}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"igfiqa: error: sbatch refused the job: sbatch: error: .*[Pp]artition", last), last
    assert "Traceback" not in proc.stderr
    runs = MlflowClient(tracking_uri=f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
