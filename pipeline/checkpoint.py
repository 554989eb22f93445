"""Checkpoints: one self-contained file per save, atomic, loadable with `weights_only=True`.

Layout of a run directory::

    RUN/checkpoints/step-00000500.ckpt   periodic / signal / final saves (the last K kept)
    RUN/checkpoints/last.ckpt            the newest save (a hard link, replaced atomically)

The file holds tensors and plain types only (see docs/contracts.md): sharded
state (classifier prototypes, their momentum, the variance table) is stored
**unsharded, by global class id**, so a run can resume on another world size.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to `path.tmp`, fsync, then `os.replace`: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, *, keep: int) -> Path:
    """Write `state` as `step-NNNNNNNN.ckpt`, point `last.ckpt` at it, keep the newest `keep` step files."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"refusing to save an incomplete checkpoint: missing {', '.join(missing)}")
    directory = checkpoint_dir(run_dir)
    path = directory / f"step-{int(state['global_step']):08d}.ckpt"
    atomic_torch_save(state, path)
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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


def load_inference_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(FIQAModel in eval mode on `device`, TrainConfig) from a training checkpoint."""
    from pipeline.config import config_from_dict
    from pipeline.method.model import build_model

    state = load_checkpoint(path, map_location="cpu")
    config = config_from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"], strict=True)
    model.to(device).eval()
    return model, config
