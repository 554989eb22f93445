"""`train()` end to end on this machine: real DALI (CPU), gloo, MLflow on sqlite.

What a finished run leaves behind (MLflow metrics by step, params, tags, artifacts;
pruned, `weights_only`-loadable checkpoints), exact resume after an interruption,
resume on another world size, 1 vs 2 processes from scratch, and the `igfiqa train`
command line (a 2-process run, and every invalid config refused before anything runs).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.config import TrainConfig, config_to_dict, dump_config, flatten_config
from tests.train_fixtures import STEP_METRICS, new_mlflow_store, tiny_config

pytest.importorskip("nvidia.dali")

REPO = Path(__file__).resolve().parents[2]
IGFIQA = Path(sys.executable).parent / "igfiqa"

# deterministic metrics: equal between two runs that trained on the same steps
DETERMINISTIC_METRICS = ("loss_arc", "loss_ig", "loss_total", "cr_mean", "quality_mean", "fr_ccs_mean")
TINY_STEPS = 30  # tiny_config: 240 images, 8 + 8 per step → 15 steps per epoch, 2 epochs
TINY_CLASSES, TINY_EMBEDDING = 40, 32


@dataclass
class FinishedRun:
    """One uninterrupted run of the tiny config, shared by the tests of this module."""

    config: TrainConfig
    result: Any  # pipeline.training.trainer.TrainResult
    uri: str


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def _artifact_files(uri: str, run_id: str, folder: str | None = None) -> set[str]:
    client, found = _client(uri), set()
    for entry in client.list_artifacts(run_id, folder):
        found |= _artifact_files(uri, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def _stop_at(step: int, code: int = 1) -> Any:
    """A `stop_requested` that asks to stop after `step` (train() polls it once per step)."""
    calls = {"n": 0}

    def poll() -> int:
        calls["n"] += 1
        return code if calls["n"] == step else 0

    return poll


def _momentum_buffers(state: dict[str, Any]) -> list[torch.Tensor]:
    buffers = state["optimizer"]["state"]
    return [buffers[i]["momentum_buffer"] for i in sorted(buffers)]


@pytest.fixture(scope="module")
def dataset(tiny_train_dataset: Path) -> Path:
    return tiny_train_dataset


@pytest.fixture(scope="module")
def finished_run(
    dataset: Path, mlflow_store_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> FinishedRun:
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    folder = tmp_path_factory.mktemp("uninterrupted")
    uri = new_mlflow_store(mlflow_store_template, folder)
    config = tiny_config(dataset, folder / "run", uri, run={"keep_checkpoints": 2})
    result = train(config, DistEnv.single())
    return FinishedRun(config, result, uri)


# --------------------------------------------------------------------------- one process, start to end


@pytest.mark.slow
def test_completed_run_logs_metrics_params_tags_and_artifacts(
    finished_run: FinishedRun, dataset: Path
) -> None:
    from data_prep.dataset import dataset_fingerprint

    config, result, uri = finished_run.config, finished_run.result, finished_run.uri
    assert (result.status, result.global_step, result.epoch) == ("completed", TINY_STEPS, 2)
    run = _client(uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"

    # every metric, once per log_every steps, at the right steps
    assert set(run.data.metrics) == STEP_METRICS
    logged_steps = list(range(config.run.log_every, TINY_STEPS + 1, config.run.log_every))
    for key in STEP_METRICS:
        assert [step for step, _ in _history(uri, result.mlflow_run_id, key)] == logged_steps, key
    assert result.metrics == pytest.approx(run.data.metrics)  # the last point is what train() returns
    assert [v for _, v in _history(uri, result.mlflow_run_id, "epoch")] == [0.0] * 7 + [1.0] * 8
    lr = [v for _, v in _history(uri, result.mlflow_run_id, "lr")]
    assert lr[0] == pytest.approx(0.05) and lr[-1] == pytest.approx(0.005)  # ÷10 at milestone epoch 1
    assert all(0.0 <= v <= 1.0 for _, v in _history(uri, result.mlflow_run_id, "data_wait_frac"))

    # params: the flattened config, verbatim
    assert run.data.params == {key: str(value) for key, value in flatten_config(config).items()}

    tags = run.data.tags
    _assert_is_a_commit_of_this_repo(tags["code_version"])  # others may commit while the run trains
    assert tags["world_size"] == "1" and tags["device"] == "cpu" and tags["hosts"]
    assert tags["dataset"] == str(dataset)
    assert tags["dataset_fingerprint"] == dataset_fingerprint(dataset)
    assert tags["run_dir"] == config.run.dir and tags["loss_mode"] == config.loss.mode
    assert tags["checkpoint"] == result.checkpoint
    assert "slurm_job_id" not in tags  # not a SLURM job

    assert _artifact_files(uri, result.mlflow_run_id) == {
        "config.yaml",
        "checkpoint.txt",
        "class_weights.png",
        "class_weights.npy",
        "training_curves.png",
        "weights/weights-epoch-000.png",
        "weights/weights-epoch-001.png",
    }
    client = _client(uri)
    config_text = Path(client.download_artifacts(result.mlflow_run_id, "config.yaml")).read_text()
    assert yaml.safe_load(config_text) == config_to_dict(config)
    checkpoint_text = Path(client.download_artifacts(result.mlflow_run_id, "checkpoint.txt")).read_text()
    assert checkpoint_text.strip() == result.checkpoint


def _assert_is_a_commit_of_this_repo(version: str) -> None:
    """`git describe --always --dirty --abbrev=12` output naming a commit of this checkout."""
    revision = version.removesuffix("-dirty").rsplit("-g", 1)[-1]  # "TAG-N-gHASH" once tags exist
    assert len(revision) >= 7, version
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, f"{version} is not a commit of {REPO}"


@pytest.mark.slow
def test_checkpoints_are_pruned_and_load_with_weights_only(finished_run: FinishedRun) -> None:
    from pipeline.method.model import load_inference_model

    config, result = finished_run.config, finished_run.result
    folder = Path(config.run.dir) / "checkpoints"
    # saves every 4 steps (4 … 28) and at the end (30); keep_checkpoints = 2
    # each checkpoint with its inference file (model and config only)
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "last.infer.pt",
        "step-00000028.ckpt",
        "step-00000028.infer.pt",
        "step-00000030.ckpt",
        "step-00000030.infer.pt",
    ]
    assert os.path.samefile(folder / "last.infer.pt", folder / "step-00000030.infer.pt")
    assert result.checkpoint == str(folder / "step-00000030.ckpt")
    assert os.path.samefile(folder / "last.ckpt", result.checkpoint)

    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == TINY_STEPS and state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert state["mlflow_run_id"] == result.mlflow_run_id and state["world_size"] == 1
    _assert_is_a_commit_of_this_repo(state["code_version"])
    assert state["config"] == config_to_dict(config)
    assert state["classifier"].shape == (TINY_CLASSES, TINY_EMBEDDING)
    assert state["classifier_momentum"].shape == (TINY_CLASSES, TINY_EMBEDDING)
    assert state["variance"].shape == (TINY_CLASSES,)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    model, loaded_config = load_inference_model(folder / "last.ckpt")
    assert loaded_config == config and not model.training


@pytest.mark.slow
def test_losses_fall_over_the_run(finished_run: FinishedRun) -> None:
    """Deterministic CPU run: measured here, loss_arc goes ~55 → ~49 (mean of the first vs the
    last three points, margin-penalised ArcFace at s = 64 on 40 classes) and loss_ig ~0.17 → ~0.04."""
    uri, run_id = finished_run.uri, finished_run.result.mlflow_run_id
    arc = [v for _, v in _history(uri, run_id, "loss_arc")]
    ig = [v for _, v in _history(uri, run_id, "loss_ig")]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    assert mean(arc[-3:]) < mean(arc[:3]) - 3.0, arc
    assert mean(ig[-3:]) < 0.5 * mean(ig[:3]), ig


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bit_identical(
    finished_run: FinishedRun, dataset: Path, mlflow_store_template: Path, tmp_path: Path
) -> None:
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    uri = new_mlflow_store(mlflow_store_template, tmp_path)
    config = tiny_config(dataset, tmp_path / "run", uri, run={"keep_checkpoints": 2})
    first = train(config, DistEnv.single(), stop_requested=_stop_at(11))
    assert (first.status, first.global_step) == ("interrupted", 11)
    assert first.checkpoint.endswith("step-00000011.ckpt")
    run = _client(uri).get_run(first.mlflow_run_id)
    assert run.info.status == "KILLED" and run.data.tags["last_interruption_step"] == "11"

    second = train(config, DistEnv.single())
    assert (second.status, second.global_step, second.epoch) == ("completed", TINY_STEPS, 2)
    assert second.mlflow_run_id == first.mlflow_run_id
    run = _client(uri).get_run(second.mlflow_run_id)
    assert run.info.status == "FINISHED" and "attempt_started_at_step_11" in run.data.tags

    resumed, reference = load_checkpoint(second.checkpoint), load_checkpoint(finished_run.result.checkpoint)
    for key, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    for key in ("classifier", "classifier_momentum", "variance"):
        assert torch.equal(resumed[key], reference[key]), key
    for got, expected in zip(_momentum_buffers(resumed), _momentum_buffers(reference), strict=True):
        assert torch.equal(got, expected)

    # one MLflow history: each log step once, the same values as the uninterrupted run except
    # step 12, whose point averages only step 12 (step 11's share ended with the first attempt)
    for key in STEP_METRICS:
        steps = [step for step, _ in _history(uri, second.mlflow_run_id, key)]
        assert steps == list(range(2, TINY_STEPS + 1, 2)), key
    for key in DETERMINISTIC_METRICS:
        got = dict(_history(uri, second.mlflow_run_id, key))
        expected = dict(_history(finished_run.uri, finished_run.result.mlflow_run_id, key))
        assert {s: v for s, v in got.items() if s != 12} == {s: v for s, v in expected.items() if s != 12}, (
            key
        )


@pytest.mark.slow
def test_igfiqa_train_with_two_processes_matches_one_and_resumes_on_one(
    dataset: Path, mlflow_store_template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`igfiqa train --nproc 2` vs 1 process from scratch, then the 2-process run continued on 1.

    The command line: its two lines, the MLflow run of world size 2, `--set` overriding the file.
    The global batch is the same (the loader splits it by rank) and the objective step is the
    same (method core), but BatchNorm normalises over each rank's share of the FR half (the
    batch that sets BN's statistics since the halves are forwarded separately), so the first
    step differs a little. Measured here after one step at 48 + 48 images (24 FR images per
    rank): loss_arc within 2 %, backbone gradients at cosine 0.84 (with the joint forward, 48
    images per rank set the statistics: 0.3 % and 0.93; the gap shrinks as the per-rank batch
    grows, as a BatchNorm effect does). Bounds leave ~2x room. Without BatchNorm the two runs
    agree to float order: test_two_processes_train_exactly_as_one_without_batch_norm.
    """
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    uri = new_mlflow_store(mlflow_store_template, tmp_path)

    def config(run_dir: Path, max_steps: int) -> TrainConfig:
        data = {"dataset": str(dataset), "fr_batch": 48, "reg_batch": 48, "num_threads": 1, "prefetch": 1}
        return tiny_config(
            dataset, run_dir, uri, data=data, optim={"max_steps": max_steps}, run={"log_every": 1}
        )

    # the file names another run dir and 2 steps: the --set flags decide
    config_path = _write_config(tmp_path / "tiny.yaml", config(tmp_path / "unused", 2))
    two_dir = tmp_path / "two"
    result = _igfiqa(
        ["train", str(config_path), "--nproc", "2", "--set", "optim.max_steps=1", "--set", f"run.dir={two_dir}",
         "--tracking-uri", uri],
        cwd=tmp_path,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    two_checkpoint = two_dir / "checkpoints" / "step-00000001.ckpt"
    assert f"completed at step 1: checkpoint {two_checkpoint}" in result.stdout
    run_line = next(line for line in result.stdout.splitlines() if line.startswith("MLflow run "))
    two_run_id = run_line.split()[2]
    assert run_line == f"MLflow run {two_run_id} in {uri}"
    two_run = _client(uri).get_run(two_run_id)
    assert two_run.info.status == "FINISHED" and two_run.data.tags["world_size"] == "2"
    assert two_run.data.params["optim.max_steps"] == "1" and two_run.data.params["run.dir"] == str(two_dir)
    assert two_checkpoint.is_file() and not (tmp_path / "unused").exists()

    one = train(config(tmp_path / "one", 1), DistEnv.single())
    assert one.status == "completed" and one.global_step == 1
    two_arc = _history(uri, two_run_id, "loss_arc")
    one_arc = _history(uri, one.mlflow_run_id, "loss_arc")
    assert [s for s, _ in two_arc] == [s for s, _ in one_arc] == [1]
    assert two_arc[0][1] == pytest.approx(one_arc[0][1], rel=0.04)
    two_state, one_state = load_checkpoint(two_checkpoint), load_checkpoint(one.checkpoint)
    assert two_state["world_size"] == 2 and one_state["world_size"] == 1
    # after SGD's first step the momentum buffer is the (clipped) gradient + weight decay
    two_grad = torch.cat([b.flatten() for b in _momentum_buffers(two_state)])
    one_grad = torch.cat([b.flatten() for b in _momentum_buffers(one_state)])
    assert float(torch.nn.functional.cosine_similarity(two_grad, one_grad, dim=0)) > 0.7
    assert float(two_grad.norm() / one_grad.norm()) == pytest.approx(1.0, rel=0.05)

    # the 2-process run continued on 1 process to the end of its first epoch (240 // 96 = 2 steps)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        resumed = train(config(two_dir, 2), DistEnv.single())
    assert "resuming a checkpoint written by 2 process(es) on 1" in caplog.text
    assert "re-sharded" in caplog.text
    assert (resumed.status, resumed.global_step, resumed.epoch) == ("completed", 2, 1)
    assert resumed.mlflow_run_id == two_run_id
    state = load_checkpoint(resumed.checkpoint)
    assert state["world_size"] == 1 and state["global_step"] == 2
    assert state["classifier"].shape == state["classifier_momentum"].shape == (TINY_CLASSES, TINY_EMBEDDING)
    assert state["variance"].shape == (TINY_CLASSES,)
    assert not torch.equal(state["classifier"], two_state["classifier"])  # it trained on
    assert [s for s, _ in _history(uri, resumed.mlflow_run_id, "loss_arc")] == [1, 2]


@pytest.mark.slow
def test_two_processes_train_exactly_as_one_without_batch_norm(
    dataset: Path, mlflow_store_template: Path, tmp_path: Path
) -> None:
    """Where the result must not depend on the world size, it does not: without BatchNorm (the only
    per-rank statistic of the step) 2 gloo processes and 1 train the same 2 steps, loss_arc,
    loss_ig and weights equal up to float summation order. A broken all-reduce, sharding or
    per-rank data split would show here as a difference far above that."""
    from jobs.launch import launch_local
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    uri = new_mlflow_store(mlflow_store_template, tmp_path)

    def config(run_dir: Path) -> TrainConfig:
        return tiny_config(
            dataset,
            run_dir,
            uri,
            data={"dataset": str(dataset), "fr_batch": 16, "reg_batch": 16, "num_threads": 1, "prefetch": 1},
            model={"backbone": "iresnet_mini_nobn", "embedding_size": 32},
            optim={"max_steps": 2},
            run={"log_every": 1},
        )

    two = launch_local(config(tmp_path / "two"), nproc=2)
    one = train(config(tmp_path / "one"), DistEnv.single())
    assert two["global_step"] == one.global_step == 2
    for key in ("loss_arc", "loss_ig"):
        two_values = [v for _, v in _history(uri, two["mlflow_run_id"], key)]
        one_values = [v for _, v in _history(uri, one.mlflow_run_id, key)]
        assert len(two_values) == len(one_values) == 2
        assert two_values == pytest.approx(one_values, rel=1e-4, abs=1e-6), key
    assert any(v > 0 for _, v in _history(uri, one.mlflow_run_id, "loss_ig"))
    two_state, one_state = load_checkpoint(two["checkpoint"]), load_checkpoint(one.checkpoint)
    for name, weights in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][name], weights, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("classifier", "variance"):
        torch.testing.assert_close(two_state[name], one_state[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- igfiqa train


def _write_config(path: Path, config: TrainConfig) -> Path:
    path.write_text(dump_config(config))
    return path


def _igfiqa(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [str(IGFIQA), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment
    )


def _dataset_without_manifest(dataset: Path, root: Path) -> str:
    """A copy of the dataset's shard files without its dataset.json (an unfinished conversion)."""
    incomplete = root / "incomplete"
    incomplete.mkdir()
    for item in dataset.iterdir():
        if item.is_file() and item.name != "dataset.json":
            (incomplete / item.name).symlink_to(item)
    return str(incomplete)


INVALID_CONFIGS = {
    # case: (overrides, nproc, what the message names)
    "wrong-type": (["optim.lr=fast"], 1, "optim.lr: expected a number"),
    "out-of-range": (["optim.momentum=1.5"], 1, "optim.momentum: 1.5 must lie in [0, 1)"),
    "missing-dataset": (["data.dataset={root}/no-such-dataset"], 1, "no-such-dataset"),
    "no-dataset-json": (["data.dataset={incomplete}"], 1, "dataset.json"),
    "num-classes": (["data.num_classes=41"], 1, "data.num_classes: 41 disagrees with the dataset"),
    "batch-vs-nproc": ([], 3, "data.fr_batch: 8 is not divisible by the world size 3"),
}


@pytest.mark.parametrize("case", sorted(INVALID_CONFIGS))
def test_igfiqa_train_refuses_invalid_configs_before_anything_runs(
    case: str,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In this process (the console script's own exit code and output: the zero-processes test)."""
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides, nproc, message = INVALID_CONFIGS[case]
    run_dir = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    config_path = _write_config(tmp_path / "tiny.yaml", tiny_config(dataset, run_dir, f"sqlite:///{db}"))
    incomplete = _dataset_without_manifest(dataset, tmp_path) if case == "no-dataset-json" else ""
    args = ["train", str(config_path), "--nproc", str(nproc)]
    for override in overrides:
        args += ["--set", override.format(root=tmp_path, incomplete=incomplete)]
    status = main(args)
    printed = capsys.readouterr()
    assert status == 2, printed.out + printed.err
    assert "igfiqa: error:" in printed.err and message in printed.err, printed.err
    assert not run_dir.exists() and not db.exists()  # nothing ran, no MLflow run was created
    assert printed.out == ""


def test_igfiqa_train_refuses_zero_processes(dataset: Path, tmp_path: Path) -> None:
    config_path = _write_config(tmp_path / "tiny.yaml", tiny_config(dataset, tmp_path / "run", ""))
    result = _igfiqa(["train", str(config_path), "--nproc", "0"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "igfiqa: error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
