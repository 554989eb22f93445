"""THE checkpoint format: what a training checkpoint holds, how it is built, written, read, restored.

Layout of a run directory::

    RUN/checkpoints/step-00000500.ckpt       periodic / signal / final saves (the last K kept)
    RUN/checkpoints/step-00000500.infer.pt   its inference file: model, config, fingerprints
    RUN/checkpoints/last.ckpt, last.infer.pt the newest save (hard links, replaced atomically)

The file holds tensors and plain types only (docs/contracts.md), so it loads with
`weights_only=True`: sharded state (classifier prototypes, their momentum, the
variance table) is stored **unsharded, by global class id**, and `restore_training`
re-shards it for whatever world size resumes. Training (`build_training_state`,
`restore_training`) read files through `load_checkpoint`.

Beside every checkpoint, `save_checkpoint` writes its inference file (`INFERENCE_SUFFIX`):
the backbone and quality head, the config, the model's fingerprint, the training run's
lineage and the payload digest of the checkpoint it came from; no classifier, optimizer or
variance table, so its size does not grow with the class count. Evaluation, scoring and
export read `load_model_state`: an inference file, or a full checkpoint, whose sibling
inference file is read instead when it records that checkpoint's digest.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import xxhash
from torch import nn

from data_prep.atomic import atomic_write
from pipeline.config import TrainConfig, config_from_dict, config_to_dict, flatten_config

FORMAT_VERSION = 1
LAST_NAME = "last.ckpt"
BEST_NAME = "best.ckpt"  # the checkpoint `run.select_by` picked (pipeline/training/validation.py)
_STEP_FILE = re.compile(r"^step-(\d{8})\.ckpt$")
INFERENCE_SUFFIX = ".infer.pt"
INFERENCE_FORMAT = "igfiqa-inference"
INFERENCE_FORMAT_VERSION = 1
# what an inference file holds; `checkpoint_digest` is the PAYLOAD_DIGEST of its checkpoint
INFERENCE_KEYS = (
    "format",
    "format_version",
    "config",
    "model",
    "model_fingerprint",
    "global_step",
    "mlflow_run_id",
    "code_version",
    "dataset_fingerprint",
    "checkpoint_digest",
)
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

PAYLOAD_DIGEST = "payload_xxh128"  # XXH3-128 of every other field, checked on load
# Config fields a resumed run may change: they move neither the data position nor the objective.
CHANGEABLE_ON_RESUME = frozenset(
    {
        "data.dataset",  # the folder may move; its fingerprint must not change
        "data.num_threads",
        "data.prefetch",
        "optim.epochs",
        "optim.max_steps",
        "run.name",
        "run.dir",
        "run.device",
        "run.log_every",
        "run.checkpoint_every_steps",
        "run.checkpoint_every_minutes",
        "run.keep_checkpoints",
        "run.tracking_uri",
        "run.experiment",
        "run.validate_every",
        "run.validation_sets",
        "run.validation_fmrs",
        "run.select_by",
        # how the step runs, not what it computes (pipeline/training/perf.py): float rounding only
        "perf.memory_format",
        "perf.optimizer_impl",
        "perf.compile",
    }
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
    state = {**state, PAYLOAD_DIGEST: payload_digest(state)}
    infer = inference_path(path)
    # the small inference file first: a full disk then never leaves a checkpoint without one
    _write_or_explain(infer, build_inference_state(state), int(state["global_step"]))
    try:
        _write_or_explain(path, state, int(state["global_step"]))
    except CheckpointError:
        infer.unlink(missing_ok=True)
        raise
    _link(path, directory / LAST_NAME)  # last.ckpt: a hard link to the newest file
    _link(infer, inference_path(directory / LAST_NAME))
    _prune(directory, keep)
    return path


def _write_or_explain(path: Path, state: dict[str, Any], step: int) -> None:
    """torch.save `state` to `path` atomically; a full disk is one CheckpointError saying what to do."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:
        # torch's zip writer turns a full disk into RuntimeError("... iostream error"): ask the disk
        needed, free = _tensor_bytes(state), shutil.disk_usage(path.parent).free
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < needed
        if not full:
            raise
        raise CheckpointError(
            f"no space left in {path.parent} for the checkpoint of step {step}: it needs "
            f"about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; make room (run.keep_checkpoints "
            "keeps fewer) and resume: the last checkpoint is intact"
        ) from None


def inference_path(checkpoint: str | Path) -> Path:
    """The inference file beside a checkpoint: step-N.ckpt → step-N.infer.pt, last.ckpt → last.infer.pt."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".ckpt") + INFERENCE_SUFFIX)


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """The first 16 hex of the SHA-256 over a state dict (names, dtypes, shapes and bytes, name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def build_inference_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inference file of a checkpoint dict that carries its PAYLOAD_DIGEST (see INFERENCE_KEYS)."""
    inference = {
        "format": INFERENCE_FORMAT,
        "format_version": INFERENCE_FORMAT_VERSION,
        "config": state["config"],
        "model": state["model"],
        "model_fingerprint": state_dict_fingerprint(state["model"]),
        "global_step": int(state["global_step"]),
        "mlflow_run_id": str(state.get("mlflow_run_id") or ""),
        "code_version": str(state.get("code_version") or ""),
        "dataset_fingerprint": str(state.get("dataset_fingerprint") or ""),
        "checkpoint_digest": str(state.get(PAYLOAD_DIGEST) or ""),
    }
    return {**inference, PAYLOAD_DIGEST: payload_digest(inference)}


def _tensor_bytes(node: Any) -> int:
    """Bytes of every tensor in a nested state: about what its file takes."""
    if isinstance(node, torch.Tensor):
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(_tensor_bytes(v) for v in node.values())
    if isinstance(node, list | tuple):
        return sum(_tensor_bytes(v) for v in node)
    return 0


def _link(target: Path, name: Path) -> None:
    """Point hard link `name` at `target`, swapped in atomically (pruning `target` keeps the data)."""
    tmp_link = name.with_name(name.name + ".tmp")
    tmp_link.unlink(missing_ok=True)
    os.link(target, tmp_link)
    os.replace(tmp_link, name)
    _fsync_dir(name.parent)


def mark_best(path: str | Path) -> Path:
    """Make `best.ckpt` beside `path` (a step file just written) point at it; returns best.ckpt."""
    path = Path(path)
    best = path.parent / BEST_NAME
    _link(path, best)
    if inference_path(path).is_file():
        _link(inference_path(path), inference_path(best))
    return best


def _prune(directory: Path, keep: int) -> None:
    steps = sorted(p for p in directory.iterdir() if _STEP_FILE.match(p.name))
    for old in steps[:-keep]:
        old.unlink(missing_ok=True)
        inference_path(old).unlink(missing_ok=True)


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a (re)started run continues from, or None for a fresh start."""
    last = checkpoint_dir(run_dir) / LAST_NAME
    return last if last.is_file() else None


def load_resume_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest intact checkpoint of a run, or None for a fresh start.

    A torn or corrupt `last.ckpt` costs a warning and the next older `step-*.ckpt` is
    tried; when none is intact the CheckpointError lists what was wrong with each.
    """
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    steps = sorted((p for p in directory.iterdir() if _STEP_FILE.match(p.name)), reverse=True)
    candidates = [p for p in (directory / LAST_NAME, *steps) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying an older checkpoint", exc)
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return path, state
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {directory}: {'; '.join(problems)}; "
            "to start afresh, use another run.dir or move that folder away"
        )
    return None


def payload_digest(state: dict[str, Any]) -> str:
    """XXH3-128 of every field but the digest itself: tensors by dtype, shape and bytes, the rest by repr.

    Catches flipped bytes in stored weights, which `torch.load` does not notice.
    """
    digest = xxhash.xxh3_128()

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node, key=str):
                if not (where == "" and key == PAYLOAD_DIGEST):
                    walk(node[key], f"{where}/{key}")
        elif isinstance(node, list | tuple):
            for i, item in enumerate(node):
                walk(item, f"{where}/{i}")
        elif isinstance(node, torch.Tensor):
            tensor = node.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{where}:{tensor.dtype}:{tuple(node.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        else:
            digest.update(f"{where}={node!r}".encode())

    walk(state, "")
    return digest.hexdigest()


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False, verify: bool = True
) -> dict[str, Any]:
    """Load and check a training checkpoint (never unpickles arbitrary objects).

    The payload digest is verified unless `verify=False` (with `mmap=True`, for callers
    that read a few fields and should not read every tensor).
    """
    path = Path(path)
    state = _read(path, map_location, mmap)
    if state.get("format") == INFERENCE_FORMAT:
        raise CheckpointError(
            f"{path}: an inference file (model and config only); training needs its full checkpoint "
            f"{path.name.removesuffix(INFERENCE_SUFFIX)}.ckpt"
        )
    return _checked_checkpoint(path, state, verify)


def _read(path: Path, map_location: str | torch.device, mmap: bool) -> dict[str, Any]:
    """torch.load with weights_only=True; CheckpointError for a missing, torn or foreign file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({_reason(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


def _checked_checkpoint(path: Path, state: dict[str, Any], verify: bool) -> dict[str, Any]:
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing keys {', '.join(missing)}")
    if verify and PAYLOAD_DIGEST in state and payload_digest(state) != state[PAYLOAD_DIGEST]:
        raise CheckpointError(f"{path}: the stored data does not match its checksum (a corrupt file)")
    return state


def _checked_inference(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    version = state.get("format_version")
    if version != INFERENCE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: inference format_version {version!r}, this code reads {INFERENCE_FORMAT_VERSION}"
        )
    missing = [k for k in INFERENCE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing keys {', '.join(missing)}")
    if payload_digest(state) != state.get(PAYLOAD_DIGEST):
        raise CheckpointError(f"{path}: the stored data does not match its checksum (a corrupt file)")
    return state


def load_model_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """What inference needs ("config", "model", "global_step", "mlflow_run_id", ...) from either file.

    An inference file is read and checked. For a full checkpoint, its sibling inference file
    (`inference_path`) is read instead when it records this checkpoint's payload digest (read
    from the memory-mapped checkpoint, whose tensors stay unread); otherwise the checkpoint
    is loaded and verified whole, as training reads it.
    """
    path = Path(path)
    if not path.name.endswith(INFERENCE_SUFFIX) and inference_path(path).is_file():
        digest = _read(path, "cpu", mmap=True).get(PAYLOAD_DIGEST)
        try:
            sibling = _checked_inference(
                inference_path(path), _read(inference_path(path), map_location, False)
            )
        except CheckpointError as exc:
            log.warning("%s; reading the full checkpoint", exc)
        else:
            if digest and sibling["checkpoint_digest"] == digest:
                return sibling
    state = _read(path, map_location, mmap=False)
    if state.get("format") == INFERENCE_FORMAT:
        return _checked_inference(path, state)
    return _checked_checkpoint(path, state, verify=True)


def _reason(exc: Exception) -> str:
    """torch.load's error in one line, without its advice to unpickle untrusted code."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        return "not a checkpoint of this project: it holds objects other than tensors and plain types"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


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
    rng_per_rank: list[dict[str, torch.Tensor]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (rank 0): every field `REQUIRED_KEYS` names, tensors on the CPU.

    `sharded` is what `ShardedTrainingState.full_state` returned on rank 0 (classifier,
    its momentum when the optimizer has one, variance table, all unsharded).
    """
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
        "rng": rng_state(device),
        "rng_per_rank": rng_per_rank or [rng_state(device)],
        "mlflow_run_id": mlflow_run_id,
        "code_version": code_version(),
        "world_size": world_size,
        "reason": reason,
        **(extra or {}),
    }
    if "classifier_momentum" in sharded:
        state["classifier_momentum"] = sharded["classifier_momentum"].cpu()
    return state


def resume_conflicts(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """The config changes a resume cannot accept, as "key: saved -> wanted" lines.

    Everything that moves the data position or changes the objective must match: data,
    batch sizes, seeds, augmentation, model, losses, variance table, optimizer and LR
    schedule. Only `CHANGEABLE_ON_RESUME` may differ (more epochs, cadences, tracking).
    """
    before, after = flatten_config(saved), flatten_config(wanted)
    keys = sorted(k for k in set(before) | set(after) if k not in CHANGEABLE_ON_RESUME)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch (and CUDA) RNG state, as a checkpoint stores it."""
    cuda = torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def check_resumable(
    path: Path, state: dict[str, Any], config: TrainConfig, *, dataset_fingerprint: str = ""
) -> None:
    """Refuse to continue a checkpoint trained on other data or with another objective."""
    try:
        saved = config_from_dict(state["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its stored config is not valid here ({exc})") from None
    conflicts = resume_conflicts(saved, config)
    stored = str(state.get("dataset_fingerprint") or "")
    if stored and dataset_fingerprint and stored != dataset_fingerprint:
        conflicts.insert(
            0, f"data.dataset content (fingerprint) {stored[:12]}… -> {dataset_fingerprint[:12]}…"
        )
    if conflicts:
        shown = "; ".join(conflicts[:8]) + (f"; and {len(conflicts) - 8} more" if len(conflicts) > 8 else "")
        raise CheckpointError(
            f"{path} was trained with other data or settings ({shown}). A run resumes only with the same "
            f"data and objective (it may change only {', '.join(sorted(CHANGEABLE_ON_RESUME))}); "
            f"to start afresh use another run.dir (--set run.dir=...) or move {path.parent.parent} away"
        )


def restore_training(
    state: dict[str, Any],
    *,
    model: nn.Module,
    model_optimizer: torch.optim.Optimizer,
    sharded: ShardedTrainingState,
    classifier_optimizer: torch.optim.Optimizer,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingPosition:
    """Load a checkpoint into this rank's training objects (re-sharding by class range); its position.

    Each rank gets back its own RNG state when the world size is unchanged, else rank 0's.
    """
    try:
        model.load_state_dict(state["model"])
        model_optimizer.load_state_dict(state["optimizer"])
        sharded.load_full_state(state, optimizer=classifier_optimizer)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint does not fit this model: {_reason(exc)}") from None
    per_rank = state.get("rng_per_rank")
    rng = per_rank[rank] if per_rank and len(per_rank) == world_size else state["rng"]
    torch.set_rng_state(rng["torch"])
    cuda_rng = rng.get("cuda")
    if device.type == "cuda" and cuda_rng is not None and cuda_rng.numel():
        torch.cuda.set_rng_state(cuda_rng)
    return TrainingPosition(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))


def training_lineage(path: str | Path) -> tuple[str, int]:
    """(MLflow run id of the training run, global step) a checkpoint or inference file records;
    a memory-mapped read."""
    state = _read(Path(path), "cpu", mmap=True)
    if state.get("format") != INFERENCE_FORMAT:
        state = _checked_checkpoint(Path(path), state, verify=False)
    return str(state.get("mlflow_run_id") or ""), int(state.get("global_step") or 0)
