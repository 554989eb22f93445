"""One training step never makes the host wait for the device.

On a GPU, `.item()`, `.tolist()`, `bool(tensor)`, `nonzero`/`unique` (data-dependent
shapes), boolean-mask indexing and copies to the host stall the CUDA stream every
step. The CPU test intercepts exactly those calls during `Trainer.step` and a
non-logging `monitor.after_step`; the GPU test runs the same step under
`torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.checkpoint import TrainingPosition
from pipeline.parallel.env import DistEnv
from pipeline.training.trainer import Trainer
from tests.train_fixtures import tiny_config, tiny_dataset

# calls whose result the host must wait for (or whose output shape depends on values)
SYNCING = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "repeat_interleave",
}


# checks whose CUDA branch is asynchronous (torch._assert_async); their CPU branch may sync
ASYNC_ON_CUDA = {"_check_labels"}


class HostSyncCounter(TorchFunctionMode):
    """Records every torch call that would synchronise a CUDA device with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", str(func))
        if _called_from(ASYNC_ON_CUDA):
            return func(*args, **(kwargs or {}))
        if name in SYNCING or (name in ("__getitem__", "__setitem__") and _bool_index(args[1:2])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _called_from(functions: set[str], depth: int = 6) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name in functions:
            return True
        frame = frame.f_back
    return False


def _bool_index(index: tuple) -> bool:
    items = index[0] if index and isinstance(index[0], tuple) else index
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _trainer(tmp_path: Path, device: str, **run: Any) -> Trainer:
    dataset = tiny_dataset(tmp_path / "data")
    config = tiny_config(
        dataset, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", run={"device": device, **run}
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


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[Trainer]:
    made = _trainer(tmp_path, "cpu", log_every=100)
    yield made
    made.loader.close()
    made.monitor.close()


def test_a_step_makes_no_host_sync(trainer: Trainer) -> None:
    trainer.ddp_model.train()
    trainer.objective.train()
    for step, (batch, values) in enumerate(_steps(trainer, 3), start=1):
        with HostSyncCounter() as counter:
            _step_and_meter(trainer, batch, values, step)
        assert counter.calls == [], f"step {step} synchronises the host: {counter.calls}"


def test_the_counter_sees_a_sync_in_the_step(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a `.item()` slipped into the objective is caught."""
    forward = type(trainer.objective).forward

    def leaky(self: Any, *args: Any) -> Any:
        out = forward(self, *args)
        out.loss_arc.item()
        return out

    monkeypatch.setattr(type(trainer.objective), "forward", leaky)
    batch, values = next(_steps(trainer, 1))
    with HostSyncCounter() as counter:
        _step_and_meter(trainer, batch, values, 1)
    assert counter.calls == ["item"]


@pytest.mark.gpu
def test_a_cuda_step_runs_under_sync_debug_error(tmp_path: Path) -> None:
    made = _trainer(tmp_path, "cuda", log_every=100, deterministic=False)
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
