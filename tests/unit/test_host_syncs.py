"""One training step never makes the host wait for the device.

On a GPU, `.item()`, `.tolist()`, `bool(tensor)`, `np.asarray(tensor)`, formatting a tensor,
`nonzero`/`unique` (data-dependent shapes), boolean-mask indexing and copies to the host
(`.cpu()`, `.to("cpu")`, `copy_` into a host tensor) stall the CUDA stream every step. The CPU
test counts those calls during `Trainer.step` and a non-logging `monitor.after_step`
(tests/host_sync_counter.py) and shows that each kind is caught; the GPU test runs the same
step under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.checkpoint import TrainingPosition
from pipeline.parallel.env import DistEnv
from pipeline.training.trainer import Trainer
from tests.host_sync_counter import HostSyncCounter
from tests.train_fixtures import new_mlflow_store, tiny_config

# Partial FC: 12 of the tiny set's 40 classes per step (ceil(0.3 × 40), more than the FR half of 8)
PARTIAL_FC = {"partial_fc": {"sample_rate": 0.3, "nnccs": "exact"}}


def _trainer(
    dataset: Path, tmp_path: Path, device: str, loss: dict[str, Any] | None = None, **run: Any
) -> Trainer:
    config = tiny_config(
        dataset,
        tmp_path / "run",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        run={"device": device, **run},
        loss=loss or {},
    )
    return Trainer(config, DistEnv.single(), torch.device(device), lambda: 0, "")


def _steps(trainer: Trainer, count: int) -> Iterator[tuple[Any, Any]]:
    trainer.loader.set_epoch(0, 0)
    batches = iter(trainer.loader)
    for step in range(count):
        yield next(batches), trainer.schedule.at(step)


def _step_and_meter(trainer: Trainer, batch: Any, values: Any, step: int) -> None:
    out, quality = trainer.step(batch, values)
    trainer.monitor.after_step(TrainingPosition(global_step=step), out, quality, values)


@pytest.fixture(scope="module")
def trainer(
    tiny_train_dataset: Path, mlflow_store_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trainer]:
    """One CPU trainer in training mode for the module: counting needs no fresh weights."""
    folder = tmp_path_factory.mktemp("host-syncs")
    new_mlflow_store(mlflow_store_template, folder)
    made = _trainer(tiny_train_dataset, folder, "cpu", log_every=100)
    made.ddp_model.train()
    made.objective.train()
    yield made
    made.loader.close()
    made.monitor.close()


@pytest.fixture(scope="module")
def batches(trainer: Trainer) -> list[tuple[Any, Any]]:
    """The first three batches of epoch 0 and their per-step values."""
    return list(_steps(trainer, 3))


def test_a_step_makes_no_host_sync(trainer: Trainer, batches: list[tuple[Any, Any]]) -> None:
    for step, (batch, values) in enumerate(batches, start=1):
        with HostSyncCounter() as counter:
            _step_and_meter(trainer, batch, values, step)
        assert counter.calls == [], f"step {step} synchronises the host: {counter.calls}"


def test_a_partial_fc_step_makes_no_host_sync(
    tiny_train_dataset: Path, mlflow_store_template: Path, tmp_path: Path
) -> None:
    """The sample's draw, the exact and the sampled NNCCS and the rows' SGD update wait for nothing."""
    new_mlflow_store(mlflow_store_template, tmp_path)
    made = _trainer(tiny_train_dataset, tmp_path, "cpu", loss=PARTIAL_FC, log_every=100)
    try:
        made.ddp_model.train()
        made.objective.train()
        for step, (batch, values) in enumerate(_steps(made, 2), start=1):
            made.objective.classifier.nnccs = ("exact", "sampled")[step - 1]
            with HostSyncCounter() as counter:
                _step_and_meter(made, batch, values, step)
            assert counter.calls == [], f"step {step} synchronises the host: {counter.calls}"
            rows = made.objective.classifier.sampled_rows
            assert rows is not None and rows.numel() < made.objective.classifier.num_local
    finally:
        made.loader.close()
        made.monitor.close()


# a host synchronisation slipped into the objective's forward, and the call the counter names
LEAKS: dict[str, tuple[Callable[[Any], object], str]] = {
    "item": (lambda out: out.loss_arc.item(), "item"),
    "to cpu": (lambda out: out.loss_arc.detach().to("cpu"), "to"),
    "np.asarray": (lambda out: np.asarray(out.cr.detach()), "__array__"),
    "copy_ into a host tensor": (lambda out: torch.zeros(()).copy_(out.loss_arc.detach()), "copy_"),
    "format": (lambda out: f"{out.loss_arc:.2f}", "__format__"),
    "boolean mask": (lambda out: out.cr[out.cr > 0], "__getitem__"),
}


def _leak_into_the_objective(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, leak: Callable) -> None:
    forward = type(trainer.objective).forward

    def leaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        leak(out)
        return out

    monkeypatch.setattr(type(trainer.objective), "forward", leaky)


@pytest.mark.parametrize("leak", list(LEAKS))
def test_the_counter_sees_a_sync_in_the_step(
    trainer: Trainer, batches: list[tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch, leak: str
) -> None:
    """The check can fail: each kind of host synchronisation slipped into the objective is caught."""
    code, name = LEAKS[leak]
    _leak_into_the_objective(trainer, monkeypatch, code)
    with HostSyncCounter() as counter:
        _step_and_meter(trainer, *batches[0], 1)
    assert counter.calls == [name]


def test_host_work_and_casts_in_the_step_are_not_syncs(
    trainer: Trainer, batches: list[tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values made on the host may be read there, and a cast or a device-side copy is no sync."""

    def host_work(out: Any) -> None:
        counts = torch.tensor([1.0, 2.0])
        assert counts.sum().item() == 3.0 and f"{counts[0]:.1f}" == "1.0" and np.asarray(counts).size == 2
        torch.zeros(2).copy_(counts)
        out.loss_arc.detach().to(torch.float64)
        torch.zeros_like(out.cr).copy_(out.cr.detach())

    _leak_into_the_objective(trainer, monkeypatch, host_work)
    with HostSyncCounter() as counter:
        _step_and_meter(trainer, *batches[0], 1)
    assert counter.calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("loss", [{}, PARTIAL_FC], ids=["full", "partial_fc"])
def test_a_cuda_step_runs_under_sync_debug_error(
    tiny_train_dataset: Path, tmp_path: Path, loss: dict[str, Any]
) -> None:
    made = _trainer(tiny_train_dataset, tmp_path, "cuda", loss=loss, log_every=100, deterministic=False)
    try:
        steps = list(_steps(made, 3))
        _step_and_meter(made, *steps[0], 1)  # warm-up: lazy CUDA initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step, (batch, values) in enumerate(steps[1:], start=2):
                _step_and_meter(made, batch, values, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        made.loader.close()
        made.monitor.close()
