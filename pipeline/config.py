"""Typed training configuration: defaults, a YAML file, dotted overrides, checked once.

`load_config(path, overrides)` merges the dataclass defaults, the YAML file and
`section.key=value` overrides (values parsed as YAML scalars), refuses unknown keys
and wrong types with the dotted path in the message, and returns a frozen
`TrainConfig`. Derived values (per-rank batch sizes, total steps) come from the
functions at the bottom, never from ad-hoc arithmetic elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


MAX_YAML_BYTES = 1 << 20  # a config or profile is a few KB; more is a mistake or an attack
MAX_YAML_ALIASES = 64  # anchors for reuse are fine; thousands are an alias bomb
MAX_SHOWN_CHARS = 120  # of a value echoed in an error message


def shown(value: Any) -> str:
    """`repr(value)`, cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents with more than MAX_YAML_ALIASES aliases.

    Hand-written (PyYAML has no such limit): a 1 KB "billion laughs" document of nested
    aliases expands to gigabytes once anything walks or prints it.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name): refused")
        return super().compose_node(parent, index)


def load_yaml_file(path: str | Path, what: str = "config") -> Any:
    """A YAML file's content, bounded in size and aliases; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a {what} file is at most {MAX_YAML_BYTES} bytes")
    try:
        return yaml.load(path.read_text(), Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {shown(str(exc))}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None


@dataclass(frozen=True)
class AugmentConfig:
    """Quality degradations applied to the regression half only (paper §3.2, §4.1)."""

    p_rescale: float = 0.3
    p_erase: float = 0.3
    p_color: float = 0.3
    # rescale: shrink to a random side in [min, max] × image size, then back up (blur)
    rescale_min: float = 0.2
    rescale_max: float = 0.8
    # random erasing: area fraction and aspect ratio ranges of the zeroed rectangle
    erase_area_min: float = 0.02
    erase_area_max: float = 0.25
    erase_aspect_min: float = 0.3
    erase_aspect_max: float = 3.3
    # color jitter: multiplicative factors drawn from [1 - x, 1 + x]
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    flip: bool = True


@dataclass(frozen=True)
class DataConfig:
    """Where the converted dataset lives and how batches are formed."""

    dataset: str = "work/demo/train"  # a folder written by `igfiqa prep convert` (holds dataset.json)
    num_classes: int = 0  # 0 = take it from dataset.json; otherwise must agree with it
    image_size: int = 112
    fr_batch: int = 512  # global size of the clean face-recognition half
    reg_batch: int = 512  # global size of the augmented regression half
    num_threads: int = 2
    prefetch: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and quality head."""

    backbone: str = "iresnet50"
    embedding_size: int = 512
    dropout: float = 0.0
    fp16: bool = False  # bf16 autocast on GPU when true
    # separate: the FR half and the regression half through the backbone in two forwards, so the FR
    # half and BN's running statistics never see the degraded images (paper §3.2); joint: one forward
    forward: Literal["separate", "joint"] = "separate"
    # how the regression half passes BatchNorm when separate: running statistics (eval mode) or
    # its own batch statistics without updating the running ones (pipeline/method/model.py)
    reg_bn: Literal["running", "batch"] = "running"
    # the quality head R's initial weights: zeros, or PyTorch's default uniform draw
    head_init: Literal["zeros", "uniform"] = "zeros"
    # what the quality head R reads: the embedding (the paper's R = Linear(D, 1)), or the embedding
    # and its norm / sqrt(D) (Linear(D + 1, 1)): after the backbone's final BatchNorm every embedding
    # dimension is centred, so a linear head on the embedding alone cannot read its norm, which
    # tracks image quality (pipeline/method/model.py)
    head_input: Literal["embedding", "embedding_and_norm"] = "embedding"


@dataclass(frozen=True)
class LossConfig:
    """ArcFace on the FR half, CR/IG regression on the regression half."""

    mode: Literal["ig", "cr"] = "ig"  # cr = all weights 1 (CR-FIQA), ig = the paper
    margin: Literal["arcface", "cosface"] = "arcface"
    scale: float = 64.0
    arc_margin: float = 0.5
    cos_margin: float = 0.35
    lambda_ig: float = 10.0
    # The paper gives no β; CR-FIQA's published train script uses SmoothL1Loss(beta=0.5).
    smooth_l1_beta: float = 0.5
    # CR-FIQA lets the regression loss reach the backbone; False detaches the embedding for R
    ig_grad_to_backbone: bool = True
    cr_eps: float = 1e-9
    # mean: Σ w·smoothL1 / (global regression batch), as CR-FIQA's code; sum: as the paper's eqs. 4 and 10
    ig_reduction: Literal["mean", "sum"] = "mean"


@dataclass(frozen=True)
class VarianceConfig:
    """The per-class EMA of 1 − CCS (paper eqs. 8–9)."""

    alpha_start: float = 0.9
    alpha_end: float = 1.0
    alpha_schedule: Literal["linear", "fixed"] = "linear"  # fixed uses alpha_start throughout
    update_from: Literal["fr", "reg"] = "fr"  # which half's CCS feeds the table
    fold: Literal["sequential", "mean"] = "sequential"  # several samples of one class in a step
    init_value: float = 1.0
    # within a step: fold this step's CCS into the table, then weigh (eqs. 8 → 9 → 10), or the reverse
    order: Literal["update_then_weigh", "weigh_then_update"] = "update_then_weigh"


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a step schedule (paper §4.1)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 36
    milestones: tuple[int, ...] = (20, 28)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float = 5.0  # 0 disables clipping
    # the quality head's LR = lr x this (1 = the paper's single LR); a larger factor lets the
    # one-layer head follow CR on short schedules without raising lambda_ig, which also scales
    # L_IG's gradient into the backbone
    head_lr_factor: float = 1.0
    max_steps: int = 0  # 0 = epochs × steps per epoch; >0 stops early (tests, demo)


@dataclass(frozen=True)
class RunConfig:
    """Where outputs go, how often to log and checkpoint, how to track."""

    name: str = "igfiqa"
    dir: str = "runs/igfiqa"
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 20
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 3
    # "" = MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory; "off" = no MLflow
    # (log lines only: quick runs, benchmarks, machines without mlflow installed)
    tracking_uri: str = ""
    experiment: str = "igfiqa"
    # validation during training (pipeline/training/validation.py): converted verification sets
    # (a folder, as `igfiqa eval --data`), every N steps and at the end (0 = at the end only)
    validation_data: str = ""
    validate_every: int = 0
    validation_fmr: float = 0.0  # 0 = the smallest FMR the sets resolve (FMR x non-mated >= 10)
    select_by: str = ""  # e.g. val.mixed.edc_pauc: the metric that picks best.ckpt ("" = none)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check `value` against a type annotation, converting only where lossless (int → float, list → tuple)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {shown(value)}")
        return _build(annotation, value, path)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{path}: {shown(value)} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {shown(value)}")
        return tuple(_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {shown(value)} does not match {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {shown(value)}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {shown(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {shown(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value} is not a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {shown(value)}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {annotation}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where}{shown(unknown[0]).strip(chr(39))} (known: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` into the dotted key and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {shown(text)}: cannot parse value: {shown(str(exc))}") from None
    return key, value


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and check a TrainConfig from a nested dict (e.g. one stored in a checkpoint)."""
    config = _build(TrainConfig, values, "")
    validate_ranges(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults ← YAML file ← dotted overrides; typed and range-checked.

    An error names where the bad value came from: the file, or the `--set` override.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = load_yaml_file(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
        try:
            config_from_dict(tree)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        try:
            config_from_dict(tree)
        except ConfigError as exc:
            raise ConfigError(f"--set {shown(text)}: {exc}") from None
    return config_from_dict(tree)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML-, JSON- and checkpoint-safe)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)


def flatten_config(config: TrainConfig) -> dict[str, Any]:
    """`{"optim.lr": 0.1, ...}` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(config_to_dict(config), "")
    return out


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------- checks


# Upper bounds far above any real use, so a typo fails here instead of in an allocation.
MAX_BATCH = 1 << 20
MAX_CLASSES = 100_000_000
MAX_EMBEDDING = 16384


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_ranges(config: TrainConfig) -> None:
    """Range checks that need no files or process group."""
    a, d, o = config.data.augment, config.data, config.optim
    for name in ("p_rescale", "p_erase", "p_color"):
        p = getattr(a, name)
        _check(0.0 <= p <= 1.0, f"data.augment.{name}: {p} is not a probability in [0, 1]")
    _check(0 < a.rescale_min <= a.rescale_max < 1.0, "data.augment.rescale_min/max: need 0 < min <= max < 1")
    _check(
        0 < a.erase_area_min <= a.erase_area_max < 1.0,
        "data.augment.erase_area_min/max: need 0 < min <= max < 1",
    )
    _check(
        0 < a.erase_aspect_min <= a.erase_aspect_max, "data.augment.erase_aspect_min/max: need 0 < min <= max"
    )
    for name in ("brightness", "contrast", "saturation"):
        v = getattr(a, name)
        _check(0.0 <= v < 1.0, f"data.augment.{name}: {v} must lie in [0, 1)")
    _check(d.image_size > 0, f"data.image_size: {d.image_size} must be positive")
    _check(d.fr_batch > 0, f"data.fr_batch: {d.fr_batch} must be positive")
    _check(d.reg_batch > 0, f"data.reg_batch: {d.reg_batch} must be positive")
    _check(d.num_threads > 0, f"data.num_threads: {d.num_threads} must be positive")
    _check(d.num_classes >= 0, f"data.num_classes: {d.num_classes} must be >= 0")
    _check(d.fr_batch <= MAX_BATCH, f"data.fr_batch: {d.fr_batch} is more than {MAX_BATCH}")
    _check(d.reg_batch <= MAX_BATCH, f"data.reg_batch: {d.reg_batch} is more than {MAX_BATCH}")
    _check(d.num_threads <= 256, f"data.num_threads: {d.num_threads} is more than 256")
    _check(d.image_size <= 1024, f"data.image_size: {d.image_size} is more than 1024")
    _check(d.num_classes <= MAX_CLASSES, f"data.num_classes: {d.num_classes} is more than {MAX_CLASSES}")
    _check(config.model.embedding_size > 0, "model.embedding_size must be positive")
    _check(
        config.model.embedding_size <= MAX_EMBEDDING,
        f"model.embedding_size: {config.model.embedding_size} is more than {MAX_EMBEDDING}",
    )
    _check(0.0 <= config.model.dropout < 1.0, "model.dropout must lie in [0, 1)")
    lo = config.loss
    _check(lo.scale > 0, f"loss.scale: {lo.scale} must be positive")
    _check(0 <= lo.arc_margin < 3.14159, f"loss.arc_margin: {lo.arc_margin} must lie in [0, pi)")
    _check(lo.lambda_ig >= 0, f"loss.lambda_ig: {lo.lambda_ig} must be >= 0")
    _check(lo.smooth_l1_beta > 0, f"loss.smooth_l1_beta: {lo.smooth_l1_beta} must be positive")
    v = config.variance
    _check(0.0 <= v.alpha_start <= 1.0, f"variance.alpha_start: {v.alpha_start} must lie in [0, 1]")
    _check(0.0 <= v.alpha_end <= 1.0, f"variance.alpha_end: {v.alpha_end} must lie in [0, 1]")
    _check(o.lr > 0, f"optim.lr: {o.lr} must be positive")
    _check(0 <= o.momentum < 1, f"optim.momentum: {o.momentum} must lie in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay: {o.weight_decay} must be >= 0")
    _check(o.epochs > 0, f"optim.epochs: {o.epochs} must be positive")
    _check(list(o.milestones) == sorted(o.milestones), f"optim.milestones: {o.milestones} must be increasing")
    _check(all(m > 0 for m in o.milestones), f"optim.milestones: {o.milestones} must be positive epochs")
    _check(0 < o.gamma <= 1, f"optim.gamma: {o.gamma} must lie in (0, 1]")
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs: {o.warmup_epochs} must be >= 0")
    _check(o.grad_clip >= 0, f"optim.grad_clip: {o.grad_clip} must be >= 0")
    _check(o.head_lr_factor > 0, f"optim.head_lr_factor: {o.head_lr_factor} must be positive")
    _check(o.max_steps >= 0, f"optim.max_steps: {o.max_steps} must be >= 0")
    r = config.run
    _check(r.log_every > 0, f"run.log_every: {r.log_every} must be positive")
    _check(r.checkpoint_every_steps >= 0, "run.checkpoint_every_steps must be >= 0 (0 disables)")
    _check(r.checkpoint_every_minutes >= 0, "run.checkpoint_every_minutes must be >= 0 (0 disables)")
    _check(r.keep_checkpoints >= 1, f"run.keep_checkpoints: {r.keep_checkpoints} must be >= 1")
    _check(r.validate_every >= 0, f"run.validate_every: {r.validate_every} must be >= 0 (0: at the end only)")
    _check(0.0 <= r.validation_fmr < 1.0, f"run.validation_fmr: {r.validation_fmr} must lie in [0, 1)")
    _check(not r.select_by or bool(r.validation_data), "run.select_by needs run.validation_data")


def validate_for_world(config: TrainConfig, world_size: int) -> None:
    """Checks that depend on the number of processes."""
    d = config.data
    _check(world_size >= 1, f"world size {world_size} must be >= 1")
    _check(
        d.fr_batch % world_size == 0,
        f"data.fr_batch: {d.fr_batch} is not divisible by the world size {world_size}",
    )
    _check(
        d.reg_batch % world_size == 0,
        f"data.reg_batch: {d.reg_batch} is not divisible by the world size {world_size}",
    )


def per_rank_batches(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(FR half, regression half) per rank."""
    validate_for_world(config, world_size)
    return config.data.fr_batch // world_size, config.data.reg_batch // world_size


def validate_for_launch(config: TrainConfig, world_size: int) -> None:
    """Everything checkable before a job starts: ranges, world size, and the dataset on disk.

    The dataset must be complete (its `dataset.json` exists) and its class count must
    agree with `data.num_classes` when that is set; the global batches must split
    evenly over `world_size` processes and one step must fit in an epoch.
    """
    from data_prep.dataset import load_dataset_info  # pipeline → data_prep, lazily
    from data_prep.errors import DataError

    validate_ranges(config)
    validate_for_world(config, world_size)
    try:
        info = load_dataset_info(config.data.dataset)
    except DataError as exc:
        raise ConfigError(f"data.dataset: {exc}") from None
    if config.data.num_classes and config.data.num_classes != info.num_classes:
        raise ConfigError(
            f"data.num_classes: {config.data.num_classes} disagrees with the dataset "
            f"{config.data.dataset} ({info.num_classes} classes)"
        )
    per_step = config.data.fr_batch + config.data.reg_batch
    if info.num_images < per_step:
        raise ConfigError(
            f"data.fr_batch + data.reg_batch = {per_step} exceeds the {info.num_images} images of "
            f"{config.data.dataset}: not even one step per epoch"
        )


def replace_section(config: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with some fields of some sections replaced, re-checked."""
    tree = config_to_dict(config)
    for section, values in sections.items():
        if section not in tree:
            raise ConfigError(f"unknown config section {section}")
        tree[section].update(values)
    return config_from_dict(tree)
