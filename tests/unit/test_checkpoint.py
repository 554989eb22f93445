"""pipeline.checkpoint: the format, field by field, through build → save → load → restore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (
    INFERENCE_KEYS,
    LAST_NAME,
    REQUIRED_KEYS,
    CheckpointError,
    TrainingPosition,
    build_training_state,
    check_resumable,
    checkpoint_dir,
    find_resume_checkpoint,
    inference_path,
    load_checkpoint,
    load_model_state,
    load_resume_checkpoint,
    restore_training,
    save_checkpoint,
    training_lineage,
)
from pipeline.config import TrainConfig, config_from_dict, config_to_dict, replace_section
from pipeline.method.model import build_model, load_inference_model, model_fingerprint
from pipeline.method.objective import IGFIQAObjective

CPU = torch.device("cpu")
CLASSES = 7


class _Parts:
    """Model, objective and both optimizers of a tiny training process."""

    def __init__(self, config: TrainConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = build_model(config.model)
        self.objective = IGFIQAObjective(CLASSES, config.model.embedding_size, config.loss, config.variance)
        self.model_optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.classifier_optimizer = torch.optim.SGD(self.objective.parameters(), lr=0.1, momentum=0.9)

    def train_one_step(self) -> None:
        images = torch.randn(4, 3, 112, 112)
        labels = torch.tensor([0, 3, 5, 6])
        embeddings, quality = self.model(images)
        out = self.objective(embeddings[:2], labels[:2], embeddings[2:], quality[2:], labels[2:], 0.9)
        out.total.backward()
        self.model_optimizer.step()
        self.classifier_optimizer.step()


def _config(tmp_path: Path) -> TrainConfig:
    return config_from_dict(
        {"model": {"backbone": "iresnet_mini", "embedding_size": 16}, "run": {"dir": str(tmp_path / "run")}}
    )


def _state(parts: _Parts, config: TrainConfig, position: TrainingPosition, reason: str = "periodic") -> dict:
    return build_training_state(
        config=config,
        model=parts.model,
        model_optimizer=parts.model_optimizer,
        sharded=parts.objective.full_state(optimizer=parts.classifier_optimizer),
        position=position,
        scheduler={"kind": "multistep", "lr": 0.1},
        mlflow_run_id="run-123",
        world_size=1,
        reason=reason,
        device=CPU,
    )


def test_every_field_survives_the_round_trip(tmp_path: Path) -> None:
    config = _config(tmp_path)
    saved = _Parts(config, seed=0)
    saved.train_one_step()
    position = TrainingPosition(epoch=2, step_in_epoch=5, global_step=17)
    torch.manual_seed(99)
    rng_before = torch.get_rng_state()
    path = save_checkpoint(_state(saved, config, position), config.run.dir, keep=2)

    state = load_checkpoint(path)
    assert set(REQUIRED_KEYS) <= set(state) and "classifier_momentum" in state
    assert state["config"] == config_to_dict(config) and state["reason"] == "periodic"
    assert training_lineage(path) == ("run-123", 17)

    torch.manual_seed(5)  # restore must bring the saved RNG back
    restored = _Parts(config, seed=1)
    got = restore_training(
        state,
        model=restored.model,
        model_optimizer=restored.model_optimizer,
        sharded=restored.objective,
        classifier_optimizer=restored.classifier_optimizer,
        device=CPU,
    )
    assert got == position
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, tensor in saved.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    assert torch.equal(restored.objective.classifier.weight, saved.objective.classifier.weight)
    assert torch.equal(restored.objective.variance.values, saved.objective.variance.values)
    for field in ("model_optimizer", "classifier_optimizer"):
        before, after = getattr(saved, field).state_dict(), getattr(restored, field).state_dict()
        for key, value in before["state"].items():
            assert torch.equal(after["state"][key]["momentum_buffer"], value["momentum_buffer"]), field

    model, loaded_config = load_inference_model(path)
    assert loaded_config == config and not model.training
    assert torch.equal(model.head.weight, saved.model.head.weight)


def test_last_points_at_the_newest_and_old_files_are_pruned(tmp_path: Path) -> None:
    config = _config(tmp_path)
    parts = _Parts(config, seed=0)
    for step in (5, 10, 15):
        save_checkpoint(_state(parts, config, TrainingPosition(global_step=step)), config.run.dir, keep=2)
    folder = checkpoint_dir(config.run.dir)
    assert sorted(p.name for p in folder.glob("step-*.ckpt")) == ["step-00000010.ckpt", "step-00000015.ckpt"]
    assert find_resume_checkpoint(config.run.dir) == folder / LAST_NAME
    assert load_checkpoint(folder / LAST_NAME)["global_step"] == 15
    assert not list(folder.glob("*.tmp*"))


def test_incomplete_and_foreign_files_are_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = _state(_Parts(config, seed=0), config, TrainingPosition())
    del state["variance"]
    with pytest.raises(CheckpointError, match="missing variance"):
        save_checkpoint(state, config.run.dir, keep=1)
    assert find_resume_checkpoint(config.run.dir) is None
    torch.save({"format_version": 99}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path / "x.ckpt")
    (tmp_path / "y.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "y.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "z.ckpt")


def test_resume_refuses_other_data_or_objective_and_allows_safe_changes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    path = save_checkpoint(_state(_Parts(config, seed=0), config, TrainingPosition()), config.run.dir, keep=1)
    state = {**load_checkpoint(path), "dataset_fingerprint": "a" * 64}
    safe = replace_section(config, optim={"epochs": 50}, run={"log_every": 7, "name": "more"})
    check_resumable(path, state, safe, dataset_fingerprint="a" * 64)
    cases = {
        "model.embedding_size: 16 -> 32": replace_section(config, model={"embedding_size": 32}),
        "data.fr_batch: 512 -> 64": replace_section(config, data={"fr_batch": 64}),
        "data.seed: 0 -> 3": replace_section(config, data={"seed": 3}),
        "loss.mode: 'ig' -> 'cr'": replace_section(config, loss={"mode": "cr"}),
        "variance.fold: 'sequential' -> 'mean'": replace_section(config, variance={"fold": "mean"}),
        "optim.lr: 0.1 -> 0.2": replace_section(config, optim={"lr": 0.2}),
    }
    for difference, wanted in cases.items():
        with pytest.raises(CheckpointError, match=r"use another run\.dir") as raised:
            check_resumable(path, state, wanted, dataset_fingerprint="a" * 64)
        assert difference in str(raised.value) and "optim.epochs" in str(raised.value)  # what may change
    with pytest.raises(
        CheckpointError, match=r"data\.dataset content \(fingerprint\) aaaaaaaaaaaa… -> bbbbbbbbbbbb…"
    ):
        check_resumable(path, state, config, dataset_fingerprint="b" * 64)


def test_flipped_bytes_are_caught_and_resume_falls_back_to_an_intact_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    parts = _Parts(config, seed=0)
    older = save_checkpoint(_state(parts, config, TrainingPosition(global_step=4)), config.run.dir, keep=3)
    newer = save_checkpoint(_state(parts, config, TrainingPosition(global_step=8)), config.run.dir, keep=3)
    assert load_resume_checkpoint(config.run.dir)[1]["global_step"] == 8
    # flip one byte inside the stored head weights (the zip stores tensors uncompressed)
    data = bytearray(newer.read_bytes())
    weights = parts.model.head.weight.detach().numpy().tobytes()
    at = bytes(data).find(weights[:32])
    assert at > 0
    data[at + 5] ^= 0xFF
    newer.write_bytes(bytes(data))  # last.ckpt is a hard link: corrupt too
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(newer)
    path, state = load_resume_checkpoint(config.run.dir)
    assert path == older and state["global_step"] == 4
    older.write_bytes(b"torn")
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint in .*checksum.*not a readable checkpoint"
    ):
        load_resume_checkpoint(config.run.dir)
    assert load_resume_checkpoint(tmp_path / "fresh") is None


def test_a_foreign_pickle_is_refused_without_torchs_advice(tmp_path: Path) -> None:
    import argparse

    torch.save({"format_version": 1, "config": argparse.Namespace(a=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path / "pickled.ckpt")
    assert "not a checkpoint of this project" in str(raised.value) and "weights_only=False" not in str(
        raised.value
    )


def test_each_rank_gets_its_own_rng_back(tmp_path: Path) -> None:
    config = _config(tmp_path)
    saved = _Parts(config, seed=0)
    states = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state(), "cuda": torch.empty(0, dtype=torch.uint8)})
    state = _state(saved, config, TrainingPosition())
    state["rng_per_rank"] = states
    for rank in (0, 1):
        restore_training(
            state,
            model=saved.model,
            model_optimizer=saved.model_optimizer,
            sharded=saved.objective,
            classifier_optimizer=saved.classifier_optimizer,
            device=CPU,
            rank=rank,
            world_size=2,
        )
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])


def test_a_state_dict_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = _state(_Parts(config, seed=0), config, TrainingPosition())
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("head")}
    path = save_checkpoint(state, config.run.dir, keep=1)
    with pytest.raises(
        CheckpointError, match=r"step-00000000\.ckpt: the checkpoint does not hold a model .*head"
    ):
        load_inference_model(path)


def test_a_full_disk_is_one_clear_error_and_the_last_checkpoint_stays(tmp_path: Path) -> None:
    import shutil as _shutil

    from tests.unit.test_convert_runs import in_small_filesystem

    if _shutil.which("unshare") is None or in_small_filesystem(tmp_path / "p", "64k", "pass").returncode:
        pytest.skip("needs unprivileged user + mount namespaces (unshare -Urm) for a small tmpfs")
    mount = tmp_path / "small"
    code = (
        "from pathlib import Path\n"
        "from pipeline.checkpoint import CheckpointError, TrainingPosition, save_checkpoint, load_resume_checkpoint\n"
        "from tests.unit.test_checkpoint import _Parts, _config, _state\n"
        f"config = _config(Path({str(mount)!r}))\n"
        "parts = _Parts(config, seed=0)\n"
        "save_checkpoint(_state(parts, config, TrainingPosition(global_step=1)), config.run.dir, keep=9)\n"
        "try:\n"
        "    for step in range(2, 50):\n"
        "        save_checkpoint(_state(parts, config, TrainingPosition(global_step=step)), config.run.dir, keep=9)\n"
        "except CheckpointError as exc:\n"
        "    print('ERROR', exc)\n"
        "    print('RESUMES', load_resume_checkpoint(config.run.dir)[1]['global_step'])\n"
    )
    result = in_small_filesystem(mount, "12m", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = next(line for line in result.stdout.splitlines() if line.startswith("ERROR"))
    assert "no space left in" in error and "MB are free" in error and "the last checkpoint is intact" in error
    resumes = int(next(line for line in result.stdout.splitlines() if line.startswith("RESUMES")).split()[1])
    assert resumes >= 1


def test_an_inference_file_beside_each_checkpoint_stands_in_for_it(tmp_path: Path) -> None:
    """Each save writes step-N.infer.pt (model, config, fingerprints; no classifier, optimizer or
    table) and last.infer.pt; its size does not grow with the class count; evaluation reads the
    same model from it as from the checkpoint, and prefers it when it belongs to that checkpoint."""
    config = _config(tmp_path)
    parts = _Parts(config, seed=0)
    parts.train_one_step()
    big = IGFIQAObjective(50_000, config.model.embedding_size, config.loss, config.variance)
    sizes = {}
    for classes, objective, step in ((CLASSES, parts.objective, 5), (50_000, big, 10)):
        state = build_training_state(
            config=config,
            model=parts.model,
            model_optimizer=parts.model_optimizer,
            sharded=objective.full_state(optimizer=parts.classifier_optimizer),
            position=TrainingPosition(global_step=step),
            scheduler={},
            mlflow_run_id="run-9",
            world_size=1,
            reason="periodic",
            device=CPU,
            extra={"dataset_fingerprint": "abc"},
        )
        path = save_checkpoint(state, config.run.dir, keep=1)
        sizes[classes] = (path.stat().st_size, inference_path(path).stat().st_size)
    folder = checkpoint_dir(config.run.dir)
    # the older step's pair was pruned together
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "last.infer.pt",
        "step-00000010.ckpt",
        "step-00000010.infer.pt",
    ]
    ckpt, infer = folder / "step-00000010.ckpt", folder / "step-00000010.infer.pt"
    assert os.path.samefile(folder / "last.infer.pt", infer)
    # 50k classes x 16: the checkpoint carries 2 x 3.2 MB of classifier and momentum, the inference file none
    assert sizes[50_000][1] * 4 < sizes[50_000][0]
    assert abs(sizes[50_000][1] - sizes[CLASSES][1]) < 512  # independent of C
    small = torch.load(infer, weights_only=True)
    assert set(small) == {*INFERENCE_KEYS, "payload_xxh128"}
    assert small["checkpoint_digest"] == load_checkpoint(ckpt)["payload_xxh128"]
    assert small["model_fingerprint"] == model_fingerprint(parts.model)
    assert training_lineage(infer) == training_lineage(ckpt) == ("run-9", 10)

    # the same model, config and outputs from either file
    from_infer, config_a = load_inference_model(infer)
    infer.rename(tmp_path / "aside.infer.pt")  # no sibling: the checkpoint is read whole
    from_ckpt, config_b = load_inference_model(ckpt)
    assert config_a == config_b == config
    images = torch.randn(3, 3, 112, 112)
    with torch.inference_mode():
        for a, b in zip(from_infer(images), from_ckpt(images)):
            assert torch.equal(a, b)
    assert model_fingerprint(from_infer) == model_fingerprint(from_ckpt) == small["model_fingerprint"]
    assert "classifier" in load_model_state(ckpt)
    # with its own sibling back, a checkpoint is read through it; a sibling of another save is ignored
    (tmp_path / "aside.infer.pt").rename(infer)
    assert load_model_state(ckpt)["format"] == "igfiqa-inference"
    save_checkpoint({**load_checkpoint(ckpt), "global_step": 11}, config.run.dir, keep=5)
    os.replace(folder / "step-00000011.infer.pt", infer)
    assert "classifier" in load_model_state(ckpt)
    # training refuses an inference file with a pointer to the checkpoint
    with pytest.raises(CheckpointError, match=r"an inference file .* step-00000010\.ckpt"):
        load_checkpoint(infer)
    # a corrupt inference file given directly is one clear error
    torch.save({**small, "global_step": 12}, infer)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_model_state(infer)
