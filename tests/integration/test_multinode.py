"""Two real nodes (`slurm/local/start.sh --nodes 2`: two slurmds, each in its own network + UTS
namespace on a private bridge, under a controller of their own; slurm/README.md).

- DDP training through `igfiqa submit` on 2 nodes x 1 task and 2 nodes x 2 tasks: ranks on
  different hosts (the MLflow `hosts` tag), rendezvous at the first node's name over the bridge,
  and final weights bit-identical to the same world size on one node (gloo's reduction order
  depends on the ranks only, so it is the same; the one-node reference runs with
  OMP_NUM_THREADS=1 like the profile's tasks: another thread count alone changes the sums, and
  this tiny training is chaotic enough that the weights then end far apart).
- A node lost mid-run (every process in its namespace SIGKILLed after a checkpoint): SLURM marks
  it DOWN after SlurmdTimeout and requeues the job itself (NODE_FAIL, JobRequeue); the surviving
  rank waits for that instead of failing the job; once the node is back the job resumes from the
  last checkpoint in the same MLflow run and ends bit-identical to the uninterrupted run.
- A hung peer (SIGSTOP): the other rank's collective times out after the profile's
  collective_timeout_s, SLURM sees no failed node, so the job fails with a clear error; the run
  is then resumed on ONE node at the same world size (what a user does when a node stays down),
  bit-identical again.
- `prep convert --submit` array tasks run on both nodes; the bytes equal a one-node conversion.

What they cost (2 busy cores, other suites running): see the module's test durations in
slurm/README.md; the tests print their measured figures at the end of the session ("measured").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.launch import submit_training
from jobs.slurm import latest_attempt_state
from pipeline.config import TrainConfig, dump_config, replace_section
from tests.integration.conftest import TWO_NODE_PROFILE, start_two_node_cluster
from tests.train_fixtures import tiny_config, tiny_dataset

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[2]
TWO_NODE_SCRIPT = REPO / "slurm" / "local" / "twonode.sh"
NODES = ("igfiqa-n1", "igfiqa-n2")
TWO_CONF = "/etc/slurm/local-2node/slurm.conf"
STEPS_PER_EPOCH = 15  # 240 images / (8 + 8) per step
JOB_TIMEOUT_S = 900.0
IMAGES_PER_STEP = 16
HUNG_TIMEOUT_S = 20  # collective_timeout_s of the hung-peer test
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass(frozen=True)
class Plan:
    """Length and checkpoint interval of a config."""

    epochs: int
    milestone: int
    checkpoint_every: int

    @property
    def total_steps(self) -> int:
        return self.epochs * STEPS_PER_EPOCH


PLAN = Plan(epochs=1, milestone=1, checkpoint_every=3)  # 15 steps: every run of this module


# --------------------------------------------------------------------------- helpers


def _config(dataset: Path, root: Path, name: str, plan: Plan) -> TrainConfig:
    return tiny_config(
        dataset,
        root / "run",
        f"sqlite:///{root / 'mlflow.db'}",
        optim={"epochs": plan.epochs, "milestones": [plan.milestone]},
        run={"name": name, "checkpoint_every_steps": plan.checkpoint_every, "log_every": 1},
    )


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _slurm(*command: str) -> str:
    """A SLURM command against the two-node cluster."""
    env = {**os.environ, "SLURM_CONF": TWO_CONF}
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env, timeout=60).stdout


def _attempts(job_id: str) -> list[tuple[str, str]]:
    """(state, node list) of each attempt of a job, oldest first."""
    out = _slurm(
        "sacct", "--noheader", "--parsable2", "--allocations", "--duplicates", "--jobs", job_id,
        "--format=JobID,State,NodeList",
    )  # fmt: skip
    return [(f[1], f[2]) for f in (line.split("|") for line in out.splitlines()) if f[0] == job_id]


def _final_attempts(job_id: str) -> list[tuple[str, str]]:
    ended = {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"}
    _wait_until(
        lambda: bool(_attempts(job_id)) and _attempts(job_id)[-1][0].split()[0] in ended,
        120,
        f"sacct to record the end of job {job_id}",
        poll_s=1.0,
    )
    return _attempts(job_id)


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _log_time(line: str) -> float:
    found = _LOG_TIME.match(line)
    assert found, line
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _step_lines(log: str) -> list[tuple[int, float]]:
    """(global step, time) of each step line of a rank-0 log (log_every = 1)."""
    return [
        (int(m.group(1)), _log_time(line))
        for line in log.splitlines()
        if (m := re.search(r"monitor: step (\d+)/\d+ ", line))
    ]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.ckpt"))


def _final_state(config: TrainConfig) -> dict[str, Any]:
    from pipeline.checkpoint import find_resume_checkpoint, load_checkpoint

    path = find_resume_checkpoint(config.run.dir)
    assert path is not None, f"no checkpoint in {config.run.dir}"
    return load_checkpoint(path)


def _assert_same_weights(state: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    assert state["global_step"] == expected["global_step"]
    assert state["world_size"] == expected["world_size"]
    differing = [k for k in expected["model"] if not torch.equal(state["model"][k], expected["model"][k])]
    assert not differing, f"{what}: model tensors differ: {differing[:5]}"
    for key in ("classifier", "classifier_momentum", "variance"):
        assert torch.equal(state[key], expected[key]), f"{what}: {key} differs"


def _mlflow(config: TrainConfig) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config.run.tracking_uri)


def _median_step_s(config: TrainConfig, run_id: str, steps: range) -> float:
    """Median wall time of a training step over `steps`, from the logged images per second."""
    history = {m.step: m.value for m in _mlflow(config).get_metric_history(run_id, "images_per_s")}
    return statistics.median(IMAGES_PER_STEP / history[s] for s in steps if s in history)


def _processes_with(command_line: str) -> list[int]:
    """PIDs whose command line (arguments joined by NUL) contains `command_line`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and command_line.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _printed(pattern: str, text: str) -> str:
    """The first group of `pattern` in what a command printed."""
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text[:3000]}"
    return found.group(1)


def _task_pid(node: str, job_id: str, rank: int) -> int:
    """The PID of a job's task (the submitit process of that rank) on a node."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout
    for pid in map(int, pids.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            b"submitit.core._submit" in cmdline
            and f"SLURM_JOB_ID={job_id}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
        ):
            return pid
    raise AssertionError(f"no task of rank {rank} of job {job_id} on {node}")


def _igfiqa_submit(config_file: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "submit",
        str(config_file),
        "--cluster",
        str(TWO_NODE_PROFILE),
    ]
    return subprocess.run(
        [*command, *extra, "--wait"],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        cwd=cwd,
        env=environment,
    )


@dataclass(frozen=True)
class CliRun:
    """What `igfiqa submit --wait` printed and left."""

    config: TrainConfig
    stdout: str
    job_id: str
    run_id: str
    stderr: Path
    state: dict[str, Any]


def _submit_and_wait(config: TrainConfig, root: Path, *extra: str) -> CliRun:
    config_file = root / "config.yaml"
    config_file.write_text(dump_config(config))
    process = _igfiqa_submit(config_file, *extra, cwd=root)
    out = process.stdout
    assert process.returncode == 0, out[-3000:] + process.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) \(", out)
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) at", out)
    stderr = re.search(r"stderr: (\S+)", out)
    assert job_id and run_id and stderr, out[:3000]
    return CliRun(config, out, job_id.group(1), run_id.group(1), Path(stderr.group(1)), _final_state(config))


def _local_reference(config: TrainConfig, nproc: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The same config on ONE node (this machine): `nproc` gloo processes, one thread each."""
    from jobs.launch import launch_local

    with monkeypatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # as the profile's tasks: the thread count changes the sums
        result = launch_local(config, nproc=nproc)
    assert result["status"] == "completed"
    return result


def _attempt_state(job_id: str) -> str:
    """The name of the state of the job's latest attempt ("" when SLURM does not know it)."""
    state = latest_attempt_state(job_id)
    return state.name if state is not None else ""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def restore_slurm_conf() -> Iterator[None]:
    """Jobs here select the two-node cluster for this process (SLURM_CONF); later modules must not
    inherit that choice."""
    saved = os.environ.get("SLURM_CONF")
    yield
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="module")
def two_nodes_one_task(
    two_node_cluster: Any, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> CliRun:
    """`igfiqa submit --wait` of PLAN on 2 nodes x 1 task: the baseline of the world-2 tests."""
    root = tmp_path_factory.mktemp("two-nodes-one-task")
    return _submit_and_wait(_config(dataset, root, "two-nodes-one-task", PLAN), root)


# --------------------------------------------------------------------------- 0. the cluster itself


@pytest.mark.timeout(300)
def test_stop_removes_what_start_made_and_start_is_idempotent(two_node_cluster: Any) -> None:
    """First in the module: it takes the two-node cluster down and up again (no job of it runs yet)."""
    one_node_ctld = Path("/var/lib/igfiqa-slurm/run/slurmctld.pid").read_text()
    stop = [str(REPO / "slurm" / "local" / "stop.sh"), "--nodes", "2"]
    for _ in range(2):  # the second stop finds nothing left and succeeds
        result = subprocess.run(["bash", *stop], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert not [n for n in NODES if Path(f"/run/netns/{n}").exists()]
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
        assert "igfiqa-br0" not in links and "igfiqa-n1-veth" not in links and "igfiqa-n2-veth" not in links
        assert "igfiqa-n1" not in Path("/etc/hosts").read_text()
        assert not _processes_with(f"slurmctld\0-f\0{TWO_CONF}")
    # the one-node cluster was left alone
    assert Path("/var/lib/igfiqa-slurm/run/slurmctld.pid").read_text() == one_node_ctld
    assert "is UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout

    started = start_two_node_cluster()
    assert started.returncode == 0, started.stderr
    hosts = Path("/etc/hosts").read_text()
    assert "10.211.0.11 igfiqa-n1" in hosts and "10.211.0.12 igfiqa-n2" in hosts
    # each node is its own host: own hostname and address, no route off the bridge
    for node, address in zip(NODES, ("10.211.0.11", "10.211.0.12"), strict=True):
        shown = _slurm("scontrol", "show", "node", node)
        assert f"NodeAddr={address}" in shown and f"NodeHostName={node}" in shown
        routes = subprocess.run(
            ["ip", "-n", node, "route"], capture_output=True, text=True, check=True
        ).stdout
        assert "default" not in routes and "10.211.0.0/24" in routes
    t0 = time.monotonic()
    again = start_two_node_cluster()
    assert again.returncode == 0 and "already up: cluster igfiqa2n" in again.stderr, again.stderr
    assert time.monotonic() - t0 < 5.0


# --------------------------------------------------------------------------- 1. training across nodes


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_nodes_one_task_each_train_like_one_node(
    two_nodes_one_task: CliRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, measurements: list[str]
) -> None:
    run = two_nodes_one_task
    assert f"submitted job {run.job_id} (2 tasks on 2 node(s))" in run.stdout
    assert run.stdout.splitlines()[-1] == f"job {run.job_id}: COMPLETED"
    assert _final_attempts(run.job_id) == [("COMPLETED", "igfiqa-n[1-2]")]
    log = _log(run.stderr)
    assert "rank 0/2 joined the gloo process group at tcp://igfiqa-n1:" in log  # the first node's name
    mlflow_run = _mlflow(run.config).get_run(run.run_id)
    assert mlflow_run.data.tags["hosts"] == "igfiqa-n1,igfiqa-n2"  # ranks on different hosts
    assert mlflow_run.data.tags["world_size"] == "2" and mlflow_run.data.tags["nodes"] == "2"

    # the same world size on one node: bit for bit
    one_node = replace_section(run.config, run={"dir": str(tmp_path / "one-node"), "name": "one-node"})
    reference = _local_reference(one_node, 2, monkeypatch)
    _assert_same_weights(run.state, _final_state(one_node), "2 nodes x 1 task vs 1 node x 2 processes")
    assert _mlflow(one_node).get_run(reference["mlflow_run_id"]).data.tags["hosts"] != "igfiqa-n1,igfiqa-n2"

    steps = range(3, PLAN.total_steps + 1)
    two = _median_step_s(run.config, run.run_id, steps)
    one = _median_step_s(one_node, reference["mlflow_run_id"], steps)
    measurements.append(
        f"world 2, median step: 2 nodes x 1 task (SLURM) {two:.3f} s, 1 node x 2 processes (local) {one:.3f} s"
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_nodes_two_tasks_each_train_like_one_node(
    two_node_cluster: Any,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    measurements: list[str],
) -> None:
    run = _submit_and_wait(
        _config(dataset, tmp_path, "two-nodes-two-tasks", PLAN), tmp_path, "--tasks-per-node", "2"
    )
    assert f"submitted job {run.job_id} (4 tasks on 2 node(s))" in run.stdout
    assert _final_attempts(run.job_id) == [("COMPLETED", "igfiqa-n[1-2]")]
    tags = _mlflow(run.config).get_run(run.run_id).data.tags
    assert tags["hosts"] == "igfiqa-n1,igfiqa-n2" and tags["world_size"] == "4"
    assert run.state["world_size"] == 4 and run.state["global_step"] == PLAN.total_steps

    one_node = replace_section(run.config, run={"dir": str(tmp_path / "one-node"), "name": "one-node-4"})
    reference = _local_reference(one_node, 4, monkeypatch)
    _assert_same_weights(run.state, _final_state(one_node), "2 nodes x 2 tasks vs 1 node x 4 processes")
    steps = range(3, PLAN.total_steps + 1)
    two = _median_step_s(run.config, run.run_id, steps)
    one = _median_step_s(one_node, reference["mlflow_run_id"], steps)
    measurements.append(
        f"world 4, median step: 2 nodes x 2 tasks (SLURM) {two:.3f} s, 1 node x 4 processes (local) {one:.3f} s"
    )


# --------------------------------------------------------------------------- 2. a node lost mid-run


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_node_lost_mid_run_is_requeued_and_resumes_into_the_same_run_and_weights(
    two_node_cluster: Any,
    dataset: Path,
    tmp_path: Path,
    two_nodes_one_task: CliRun,
    measurements: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_CONF", TWO_CONF)  # latest_attempt_state asks this process's cluster
    config = _config(dataset, tmp_path, "node-lost", PLAN)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    # `igfiqa submit --wait` follows the job through the node failure and the requeue
    out_path = tmp_path / "submit.out"
    environment = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "submit",
        str(config_file),
        "--cluster",
        str(TWO_NODE_PROFILE),
    ]
    with out_path.open("w") as out:
        follower = subprocess.Popen(
            [*command, "--wait"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=environment
        )
    try:
        _wait_until(lambda: "stderr: " in out_path.read_text(), 120, "igfiqa submit to print the job")
        printed = out_path.read_text()
        job_id = _printed(r"submitted job (\d+) \(2 tasks on 2 node\(s\)\)", printed)
        run_id = _printed(r"MLflow run ([0-9a-f]{32}) at", printed)
        stderr = Path(_printed(r"stderr: (\S+)", printed))
        run_dir = Path(config.run.dir)
        _wait_until(lambda: bool(_checkpoint_steps(run_dir)), JOB_TIMEOUT_S, "a periodic checkpoint")
        first = _checkpoint_steps(run_dir)[0]
        # between two checkpoints, as a failure usually comes: the steps since the last one are lost
        _wait_until(lambda: first + 2 in dict(_step_lines(_log(stderr))), 120, f"step {first + 2}")
        killed_at = time.time()
        kill = subprocess.run(
            ["bash", str(TWO_NODE_SCRIPT), "kill-node", "igfiqa-n2"], capture_output=True, text=True
        )
        assert kill.returncode == 0, kill.stderr
        saved = _checkpoint_steps(run_dir)[-1]
        assert saved <= PLAN.total_steps - 2 * PLAN.checkpoint_every, f"too late (step {saved})"

        # SLURM notices (SlurmdTimeout), ends the attempt with NODE_FAIL and requeues the job
        _wait_until(
            lambda: [a for a in _attempts(job_id) if a[0] == "NODE_FAIL"] != [],
            180,
            "SLURM to requeue the job after the node failure",
            poll_s=1.0,
        )
        requeued_at = time.time()
        node = _slurm("sinfo", "--noheader", "--nodes=igfiqa-n2", "--format=%T").strip()
        assert node.startswith("down"), node
        # requeued: the job waits (PENDING, once the surviving node has finished COMPLETING) for 2 nodes
        assert _attempt_state(job_id) in {"COMPLETING", "PENDING"}
        assert follower.poll() is None, out_path.read_text()[-3000:]  # --wait knows the job goes on
        # the node comes back: start.sh --nodes 2 starts its slurmd again
        back = start_two_node_cluster()
        assert back.returncode == 0, back.stderr
        back_at = time.time()
        assert follower.wait(timeout=JOB_TIMEOUT_S) == 0, out_path.read_text()[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
        start_two_node_cluster()  # whatever happened, the next tests find both nodes up
    assert out_path.read_text().splitlines()[-1] == f"job {job_id}: COMPLETED"
    attempts = _final_attempts(job_id)
    assert [a[0] for a in attempts] == ["NODE_FAIL", "COMPLETED"], attempts
    assert attempts[-1][1] == "igfiqa-n[1-2]"

    log = _log(stderr)
    lost = [line for line in log.splitlines() if "PEER LOST: rank 0 of 2 on igfiqa-n1" in line]
    assert lost and "[10.211.0.12]" in lost[0], log[-3000:]  # the peer's address on the bridge
    assert "DUE TO NODE FAILURE" in log
    resumed = re.findall(r"resumed from .*global step (\d+)/", log)
    assert [int(step) for step in resumed] == [saved]
    steps = _step_lines(log)
    reached = max(s for s, t in steps if t <= killed_at)
    first_resumed_step_at = min(t for s, t in steps if s == saved + 1 and t > killed_at)

    mlflow_run = _mlflow(config).get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["hosts"] == "igfiqa-n1,igfiqa-n2"
    assert mlflow_run.data.tags["slurm_job_id"] == job_id
    assert f"attempt_started_at_step_{saved}" in mlflow_run.data.tags
    assert len(_mlflow(config).search_runs([mlflow_run.info.experiment_id])) == 1  # no second run
    _assert_same_weights(_final_state(config), two_nodes_one_task.state, "node-lost run vs uninterrupted run")
    measurements.append(
        f"node loss: killed after step {reached} (last checkpoint {saved}: {reached - saved} step(s) lost); "
        f"SLURM requeued the job {requeued_at - killed_at:.0f} s after the kill; node back -> first resumed "
        f"step {first_resumed_step_at - back_at:.0f} s (requeue -> first resumed step "
        f"{first_resumed_step_at - requeued_at:.0f} s)"
    )


# --------------------------------------------------------------------------- 3. a hung peer


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_hung_peer_fails_the_job_clearly_and_the_run_resumes_on_one_node(
    two_node_cluster: Any,
    dataset: Path,
    tmp_path: Path,
    two_nodes_one_task: CliRun,
    measurements: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from jobs.train_job import slurm_reaction_s

    monkeypatch.setenv("SLURM_CONF", TWO_CONF)  # latest_attempt_state asks this process's cluster
    profile = dataclasses.replace(two_node_cluster.profile, collective_timeout_s=HUNG_TIMEOUT_S)
    config = _config(dataset, tmp_path, "hung-peer", PLAN)
    submission = submit_training(config, profile)
    run_dir = Path(config.run.dir)
    _wait_until(lambda: bool(_checkpoint_steps(run_dir)), JOB_TIMEOUT_S, "a periodic checkpoint")
    rank1 = _task_pid("igfiqa-n2", submission.job_id, rank=1)
    os.kill(rank1, signal.SIGSTOP)  # alive, connected, silent: only a timeout can tell
    stopped_at = time.time()
    try:
        _wait_until(
            lambda: _attempt_state(submission.job_id) in {"FAILED", "COMPLETED", "CANCELLED", "NODE_FAIL"},
            JOB_TIMEOUT_S,
            f"job {submission.job_id} to end",
            poll_s=1.0,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank1, signal.SIGCONT)
    attempts = _final_attempts(submission.job_id)
    assert [a[0] for a in attempts] == ["FAILED"], attempts  # no node failed: SLURM requeues nothing
    log = _log(submission.stderr)
    ended_at = max(
        _log_time(line)
        for line in log.splitlines()
        if "Submitted job triggered an exception" in line and _LOG_TIME.match(line)
    )
    assert f"Timed out waiting {HUNG_TIMEOUT_S * 1000}ms" in log, log[-3000:]
    assert "PEER LOST: rank 0 of 2 on igfiqa-n1" in log
    error = [line for line in log.splitlines() if "PeerFailureError: rank 0 on igfiqa-n1" in line]
    assert error and "submit the same config again" in error[-1] and "last.ckpt" in error[-1]
    # the collective timeout, then SLURM's chance to requeue, then the failure (plus start-up slack)
    failed_after = ended_at - stopped_at
    assert failed_after < HUNG_TIMEOUT_S + slurm_reaction_s(15) + 60, failed_after
    with pytest.raises(Exception, match="PeerFailureError"):
        submission.job.results()
    assert _mlflow(config).get_run(submission.mlflow_run_id).info.status == "FAILED"
    saved = _checkpoint_steps(run_dir)[-1]

    # the run resumes on ONE node at the same world size (2 tasks there): bit-identical
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    process = _igfiqa_submit(config_file, "--nodes", "1", "--tasks-per-node", "2", cwd=tmp_path)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "(2 tasks on 1 node(s))" in process.stdout
    assert f"MLflow run {submission.mlflow_run_id} at" in process.stdout  # the same run continues
    resumed_log = re.search(r"stderr: (\S+)", process.stdout)
    assert resumed_log
    assert re.search(rf"resumed from .*global step {saved}/", _log(Path(resumed_log.group(1))))
    mlflow_run = _mlflow(config).get_run(submission.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["hosts"] == "igfiqa-n1" and mlflow_run.data.tags["nodes"] == "1"
    _assert_same_weights(_final_state(config), two_nodes_one_task.state, "resumed on one node vs 2 nodes")

    steps = range(saved + 2, PLAN.total_steps + 1)
    one = _median_step_s(config, submission.mlflow_run_id, steps)
    two = _median_step_s(two_nodes_one_task.config, two_nodes_one_task.run_id, steps)
    measurements.append(
        f"hung peer: job FAILED {failed_after:.0f} s after SIGSTOP (collective_timeout_s {HUNG_TIMEOUT_S} "
        f"+ wait for SLURM {slurm_reaction_s(15)} s); world 2 median step on SLURM: 1 node {one:.3f} s, "
        f"2 nodes {two:.3f} s"
    )


# --------------------------------------------------------------------------- 4. array tasks on both nodes


@pytest.mark.timeout(600)
def test_prep_array_tasks_run_on_both_nodes_and_match_a_one_node_conversion(
    two_node_cluster: Any, submitit_folder: Callable[[], Path], tmp_path: Path
) -> None:
    from data_prep.convert import convert
    from data_prep.synth import synthesize
    from jobs.prep_job import start_conversion

    source = tmp_path / "synth"
    synthesize(source, identities=24, images_per_identity=6, seed=3)
    local = convert(source, tmp_path / "local", samples_per_shard=20, seed=7, progress=False)
    assert len(local.shards) >= 6
    array = start_conversion(
        source,
        tmp_path / "two-nodes",
        profile=two_node_cluster.profile,
        samples_per_shard=20,
        seed=7,
        folder=submitit_folder(),
        progress=False,
    )
    info = array.wait(progress=False)
    assert info.num_images == local.num_images and len(info.shards) == len(local.shards)

    def tasks() -> list[list[str]]:
        out = _slurm(
            "sacct", "--noheader", "--parsable2", "--allocations", "--jobs", array.array_id,
            "--format=JobID,State,NodeList",
        )  # fmt: skip
        return [line.split("|") for line in out.splitlines()]

    # accounting records the array's tasks a little after their results are written
    _wait_until(
        lambda: len(tasks()) == len(local.shards) and {r[1] for r in tasks()} == {"COMPLETED"},
        120,
        "sacct to record every array task",
        poll_s=1.0,
    )
    assert {r[2] for r in tasks()} == set(NODES), tasks()  # tasks ran on both nodes

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and ".prep" not in p.relative_to(root).parts
        }

    one, two = files(tmp_path / "local"), files(tmp_path / "two-nodes")
    assert sorted(one) == sorted(two)
    assert [n for n in one if n != "dataset.json" and one[n] != two[n]] == []
    assert json.loads(one["dataset.json"]) == json.loads(two["dataset.json"])
