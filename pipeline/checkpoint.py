"""THE checkpoint format: what a training checkpoint holds, how it is built, written, read, restored.

Layout of a run directory::

    RUN/checkpoints/step-00000500.ckpt   periodic / signal / final saves (the last K kept)
    RUN/checkpoints/last.ckpt            the newest save (a hard link, replaced atomically)

The file holds tensors and plain types only (docs/contracts.md), so it loads with
`weights_only=True`: sharded state (classifier prototypes, their momentum, the
variance table) is stored **unsharded, by global class id**, and `restore_training`
re-shards it for whatever world size resumes. Training (`build_training_state`,
`restore_training`) and evaluation (`pipeline.method.model.load_inference_model`)
both read files through `load_checkpoint`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from data_prep.atomic import atomic_write
from pipeline.config import TrainConfig, config_from_dict, config_to_dict

FORMAT_VERSION = 1
LAST_NAME = "last.ckpt"
_STEP_FILE = re.compile(r"^step-(\d{8})\.ckpt$")
REQUIRED_KEYS = (
    "format_version",
    "config",
    "model",
    "classifier",
    "variance",
    "optimizer",
    "scheduler",
    "epoch",
    "step_in_epoch",
    "global_step",
    "rng",
    "mlflow_run_id",
    "code_version",
    "world_size",
)

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not in the expected format."""


def code_version() -> str:
    """`git describe`-style revision of the code (with `-dirty`), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, *, keep: int) -> Path:
    """Write `state` as `step-NNNNNNNN.ckpt`, point `last.ckpt` at it, keep the newest `keep` step files."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"refusing to save an incomplete checkpoint: missing {', '.join(missing)}")
    directory = checkpoint_dir(run_dir)
    path = directory / f"step-{int(state['global_step']):08d}.ckpt"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    # last.ckpt: a hard link to the newest file, swapped in atomically
    tmp_link = directory / (LAST_NAME + ".tmp")
    tmp_link.unlink(missing_ok=True)
    os.link(path, tmp_link)
    os.replace(tmp_link, directory / LAST_NAME)
    _fsync_dir(directory)
    _prune(directory, keep)
    return path


def _prune(directory: Path, keep: int) -> None:
    steps = sorted(p for p in directory.iterdir() if _STEP_FILE.match(p.name))
    for old in steps[:-keep]:
        old.unlink(missing_ok=True)


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a (re)started run continues from, or None for a fresh start."""
    last = checkpoint_dir(run_dir) / LAST_NAME
    return last if last.is_file() else None


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load and check a training checkpoint (never unpickles arbitrary objects).

    `mmap=True` maps the tensors instead of reading them, for callers that read a few fields.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing keys {', '.join(missing)}")
    return state


@dataclass
class TrainingPosition:
    """Where training stands: restored from a checkpoint, advanced by one per optimizer step."""

    epoch: int = 0
    step_in_epoch: int = 0  # the next step of `epoch` to run
    global_step: int = 0  # optimizer steps done


class ShardedTrainingState(Protocol):
    """What the objective offers the checkpoint: its sharded tensors, unsharded on one rank."""

    def full_state(
        self, optimizer: torch.optim.Optimizer | None = None, dst: int | None = 0
    ) -> dict[str, torch.Tensor]: ...

    def load_full_state(
        self, state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> None: ...


def build_training_state(
    *,
    config: TrainConfig,
    model: nn.Module,
    model_optimizer: torch.optim.Optimizer,
    sharded: dict[str, torch.Tensor],
    position: TrainingPosition,
    scheduler: dict[str, Any],
    mlflow_run_id: str,
    world_size: int,
    reason: str,
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (rank 0): every field `REQUIRED_KEYS` names, tensors on the CPU.

    `sharded` is what `ShardedTrainingState.full_state` returned on rank 0 (classifier,
    its momentum when the optimizer has one, variance table, all unsharded).
    """
    cuda_rng = torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classifier": sharded["classifier"].cpu(),
        "variance": sharded["variance"].cpu(),
        "optimizer": model_optimizer.state_dict(),
        "scheduler": dict(scheduler),
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "global_step": position.global_step,
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng},
        "mlflow_run_id": mlflow_run_id,
        "code_version": code_version(),
        "world_size": world_size,
        "reason": reason,
        **(extra or {}),
    }
    if "classifier_momentum" in sharded:
        state["classifier_momentum"] = sharded["classifier_momentum"].cpu()
    return state


def check_resumable(path: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to continue a checkpoint whose model differs from what `config` builds."""
    saved = config_to_dict(config_from_dict(state["config"]))["model"]
    wanted = config_to_dict(config)["model"]
    if saved != wanted:
        raise CheckpointError(
            f"{path}: saved with model {saved}, but the config asks for {wanted}; "
            "use another run.dir to start afresh"
        )


def restore_training(
    state: dict[str, Any],
    *,
    model: nn.Module,
    model_optimizer: torch.optim.Optimizer,
    sharded: ShardedTrainingState,
    classifier_optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> TrainingPosition:
    """Load a checkpoint into this rank's training objects (re-sharding by class range); its position."""
    model.load_state_dict(state["model"])
    model_optimizer.load_state_dict(state["optimizer"])
    sharded.load_full_state(state, optimizer=classifier_optimizer)
    torch.set_rng_state(state["rng"]["torch"])
    cuda_rng = state["rng"].get("cuda")
    if device.type == "cuda" and cuda_rng is not None and cuda_rng.numel():
        torch.cuda.set_rng_state(cuda_rng)
    return TrainingPosition(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))


def training_lineage(path: str | Path) -> tuple[str, int]:
    """(MLflow run id of the training run, global step) a checkpoint records; a memory-mapped read."""
    state = load_checkpoint(path, mmap=True)
    return str(state.get("mlflow_run_id") or ""), int(state.get("global_step") or 0)
