"""Several jobs logging to one real `mlflow server` at once lose nothing.

The test starts `mlflow server` (sqlite backend, local artifact root, 2 workers) on
loopback, then runs at the same time two tiny trainings (`igfiqa train ...
--tracking-uri http://127.0.0.1:PORT`) and a few writer processes that each log
hundreds of metric points through `pipeline.tracking.store.RunTracker` (from the moment
both trainings have logged their first point, so all of them write together); every metric
point, param, tag and artifact must arrive. Start-up of the server measured here:
~18 s on 2 busy cores (each worker imports MLflow).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import dump_config, flatten_config
from pipeline.parallel.env import free_port
from tests.train_fixtures import STEP_METRICS, tiny_config

pytest.importorskip("nvidia.dali")

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 180.0
WRITERS, WRITER_STEPS, WRITER_PARAMS = 3, 300, 40
TRAININGS, TRAIN_STEPS = 2, 10


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def mlflow_server(mlflow_store_template: Path, tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port; its URL. Stopped (process group) at the end."""
    shutil.copyfile(mlflow_store_template, tmp_path / "server.db")  # its store, tables made
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--default-artifact-root",
        str(tmp_path / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _wait_until_logging(client: Any, experiment: str, trainings: list[subprocess.Popen[str]]) -> None:
    """Block until every training has logged its first metric point (so the writers overlap them)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert all(t.poll() is None for t in trainings), "a training ended before logging anything"
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            runs = client.search_runs([found.experiment_id])
            if sum(1 for run in runs if run.data.metrics) == len(trainings):
                return
        time.sleep(0.5)
    pytest.fail("the trainings logged no metric within 300 s")


def write_points(url: str, index: int, go: Any, results: Any) -> None:
    """One writer process: a run with params, WRITER_STEPS batches of 2 metrics, a text artifact.

    It creates its run at once, then waits for `go` before logging the rest."""
    from pipeline.tracking.store import RunTracker

    tracker = RunTracker.start(tracking_uri=url, experiment="writers", run_name=f"writer-{index}")
    go.wait(timeout=600)
    tracker.log_params({f"param_{j:02d}": f"{index}-{j}" for j in range(WRITER_PARAMS)})
    for step in range(WRITER_STEPS):
        tracker.log_metrics({"value": index * 10_000 + step, "square": float(step * step)}, step)
    tracker.log_text(f"writer {index}\n", "notes/writer.txt")
    tracker.finish()
    results.put((index, tracker.run_id))


def _igfiqa_train(config_path: Path, run_dir: Path, url: str, log_path: Path) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [
        str(BIN / "igfiqa"),
        "train",
        str(config_path),
        "--set",
        f"optim.max_steps={TRAIN_STEPS}",
        "--set",
        f"run.dir={run_dir}",
        "--tracking-uri",
        url,
    ]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            args, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=log, text=True, env=environment
        )


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_concurrent_trainings_and_writers_lose_nothing(
    mlflow_server: str, tiny_train_dataset: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    url = mlflow_server
    config = tiny_config(tiny_train_dataset, tmp_path / "unused", url)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(dump_config(config))

    trainings = []
    for i in range(TRAININGS):
        run_dir = tmp_path / f"train-{i}"
        trainings.append(_igfiqa_train(config_path, run_dir, url, tmp_path / f"train-{i}.log"))
    context = multiprocessing.get_context("spawn")
    go, results = context.Event(), context.SimpleQueue()
    writers = [context.Process(target=write_points, args=(url, i, go, results)) for i in range(WRITERS)]
    for writer in writers:
        writer.start()
    client = MlflowClient(tracking_uri=url)
    try:
        _wait_until_logging(client, config.run.experiment, trainings)
    except BaseException:
        for process in [*trainings, *writers]:
            process.kill()
        raise
    go.set()
    for writer in writers:
        writer.join(timeout=600)
        assert writer.exitcode == 0, f"writer exited with {writer.exitcode}"
    outputs = [training.communicate(timeout=600)[0] for training in trainings]
    for i, training in enumerate(trainings):
        assert training.returncode == 0, (tmp_path / f"train-{i}.log").read_text()[-3000:]

    writer_runs = dict(results.get() for _ in range(WRITERS))
    assert sorted(writer_runs) == list(range(WRITERS))
    for index, run_id in writer_runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"param_{j:02d}": f"{index}-{j}" for j in range(WRITER_PARAMS)}
        values = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "value"))
        assert values == [(step, float(index * 10_000 + step)) for step in range(WRITER_STEPS)]
        squares = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "square"))
        assert squares == [(step, float(step * step)) for step in range(WRITER_STEPS)]
        text = client.download_artifacts(run_id, "notes/writer.txt", str(tmp_path / f"dl-{index}"))
        assert Path(text).read_text() == f"writer {index}\n"

    writer_start = min(
        min(m.timestamp for m in client.get_metric_history(run_id, "value"))
        for run_id in writer_runs.values()
    )
    logged_steps = list(range(config.run.log_every, TRAIN_STEPS + 1, config.run.log_every))
    for i, output in enumerate(outputs):
        run_line = next(line for line in output.splitlines() if line.startswith("MLflow run "))
        run = client.get_run(run_line.split()[2])
        assert run.info.status == "FINISHED"
        assert run.data.params["run.dir"] == str(tmp_path / f"train-{i}")
        assert len(run.data.params) == len(flatten_config(config))
        assert run.data.tags["world_size"] == "1" and run.data.tags["checkpoint"].endswith(
            f"step-{TRAIN_STEPS:08d}.ckpt"
        )
        assert set(run.data.metrics) == STEP_METRICS
        for key in run.data.metrics:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == logged_steps, key
        last_point = max(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss_arc"))
        assert last_point > writer_start  # the training logged while the writers were writing
        artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "checkpoint.txt", "class_weights.png", "class_weights.npy"} <= artifacts
        assert "training_curves.png" in artifacts
