"""Typed training configuration: defaults, a YAML file, dotted overrides, checked once.

`load_config(path, overrides)` merges the dataclass defaults, the YAML file and
`section.key=value` overrides (values parsed as YAML scalars) through the typed loader of
`pipeline.config_loader`, which refuses unknown keys and wrong types with the dotted path in
the message; `validate_ranges` adds the range checks, and a frozen `TrainConfig` comes back.
Derived values come from this module, never from ad-hoc arithmetic elsewhere: the batch
layout (global and per-rank halves, this rank's offsets, steps per epoch) is `BatchLayout`,
computed once per process and passed on; total steps come from `pipeline.training.schedules`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config_loader import (
    ConfigError,
    from_mapping,
    load_yaml_mapping,
    parse_override,
    set_dotted,
    shown,
    to_plain,
)


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
    # global size of the augmented regression half (0 with loss.mode fr or data.batch_mode single)
    reg_batch: int = 512
    # split: the paper's two halves (FR half clean, regression half degraded); single: CR-FIQA's
    # published training, one batch of fr_batch images, every image degraded at data.augment's rates,
    # the margin loss AND the regression loss on it (needs reg_batch 0; the FR loss sees degraded images)
    batch_mode: Literal["split", "single"] = "split"
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
class PartialFCConfig:
    """Partial FC (An et al., arcface_torch's partial_fc_v2): each step uses a sample of the classes.

    Each rank keeps the positives of the global batch that fall in its class shard and draws
    negatives of its shard at random (seeded by run seed, step and rank) up to
    ceil(sample_rate × shard size) rows, or the global FR batch size if that is larger (so
    every positive fits without asking the device how many there are); logits, gradients and
    the SGD update (weight and momentum) touch those rows only. 1.0 is the full classifier.

    nnccs: CR's denominator needs the nearest OTHER class centre, which the sample may miss.
    `exact` takes it over every class of the shard (no gradient, in chunks of rows, then an
    all-reduced max); `sampled` over this step's sampled rows only, an under-estimate of NNCCS
    that biases CR up. Default `exact`, from benchmarks/partial_fc.py (README, "Design choices
    where the paper leaves room"): on a trained ArcFace model (400 classes) sampled NNCCS moved
    CR by 0.043 on average and 0.126 at the 99th percentile at rate 0.1 (CR's mean is 0.62: +7 %,
    always upwards; 0.018 / 0.077 at rate 0.3), while the exact max cost one no-grad pass over
    the shard: at C = 100k, D = 512 on CPU the step at rate 0.1 took 1.74 s exact against
    1.06 s sampled and 6.03 s at rate 1 (medians of 5).
    """

    sample_rate: float = 1.0  # in (0, 1]
    nnccs: Literal["exact", "sampled"] = "exact"


@dataclass(frozen=True)
class LossConfig:
    """ArcFace on the FR half, CR/IG regression on the regression half."""

    # ig = the paper; cr = all weights 1 (CR-FIQA); fr = face recognition only: the margin loss on
    # the FR half, no regression half (data.reg_batch: 0) and no quality-head loss, the head frozen
    # (the reference matchers of `igfiqa matchers build`)
    mode: Literal["ig", "cr", "fr"] = "ig"
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
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)


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
class PerfConfig:
    """How the training step runs, not what it computes: each switch changes speed and float rounding
    only, so a run may resume with other values (pipeline/training/perf.py applies them).

    - `memory_format` (auto): the backbone's convolutions in NHWC (channels_last) or NCHW
      (contiguous). auto = channels_last on CUDA, where cuDNN's bf16 tensor-core convolutions run
      in NHWC and an NCHW model pays a transpose around each one (pending the GPU check's
      measurement, benchmarks/gpu_check.sh); on CPU each backbone's own layout: NHWC for
      iresnet_tiny/small (measured faster there), NCHW for the others, because on iResNet-50 NHWC
      made oneDNN's convolutions faster and BatchNorm as much slower (README "Speed").
    - `optimizer_impl` (auto): torch.optim.SGD's implementation. loop: one parameter at a time;
      foreach: one multi-tensor kernel per operation over all parameters; fused: one kernel for the
      whole update. auto = fused on CUDA (fewest launches and passes over memory; pending the GPU
      check), loop on CPU (the optimizer is ~4 % of an iResNet-50 step there, foreach no faster).
      On CPU all three give bit-identical weights (tests/unit/test_perf_levers.py).
    - `compile` (none): `torch.compile` of the backbone (Inductor fuses BatchNorm, PReLU and the
      residual add around the convolutions). none until the GPU check has measured it: compiling
      takes minutes at start-up (~4 min for iresnet_mini's train- and eval-mode graphs on 2 shared
      CPU cores) and again for a new input shape. The whole step is not compiled: the backbone's
      convolutions, BatchNorm and PReLU hold ~85 % of an iResNet-50 step (README "Speed"); compiling the
      objective (collectives over the classifier shards) and SGD would need exactness tests of
      their own for the few per cent left.
    """

    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    optimizer_impl: Literal["auto", "loop", "foreach", "fused"] = "auto"
    compile: Literal["none", "backbone"] = "none"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


# --------------------------------------------------------------------------- loading


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and check a TrainConfig from a nested dict (e.g. one stored in a checkpoint)."""
    config = from_mapping(TrainConfig, values)
    validate_ranges(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults ← YAML file ← dotted overrides; typed and range-checked.

    An error names where the bad value came from: the file, or the `--set` override. A key or
    type error is the override's own; a range error is checked on the end result, so keys that
    go together can be set one after the other (`--set loss.mode=fr --set data.reg_batch=0`), and
    one that remains is blamed on the override after which it first appeared.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        tree = load_yaml_mapping(path)
        try:
            config_from_dict(tree)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    first_seen: dict[str, str] = {}  # range error → the override after which it first appeared
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
        try:
            config = from_mapping(TrainConfig, tree)
        except ConfigError as exc:
            raise ConfigError(f"--set {shown(text)}: {exc}") from None
        try:
            validate_ranges(config)
        except ConfigError as exc:
            first_seen.setdefault(str(exc), text)
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        blamed = first_seen.get(str(exc))
        raise (ConfigError(f"--set {shown(blamed)}: {exc}") if blamed else exc) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML-, JSON- and checkpoint-safe)."""
    return to_plain(config)


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
    _check(d.reg_batch >= 0, f"data.reg_batch: {d.reg_batch} must be >= 0 (0 only with loss.mode fr)")
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
    _check_fr_only(config)
    _check(lo.scale > 0, f"loss.scale: {lo.scale} must be positive")
    _check(0 <= lo.arc_margin < 3.14159, f"loss.arc_margin: {lo.arc_margin} must lie in [0, pi)")
    _check(lo.lambda_ig >= 0, f"loss.lambda_ig: {lo.lambda_ig} must be >= 0")
    _check(lo.smooth_l1_beta > 0, f"loss.smooth_l1_beta: {lo.smooth_l1_beta} must be positive")
    rate = lo.partial_fc.sample_rate
    _check(0.0 < rate <= 1.0, f"loss.partial_fc.sample_rate: {rate} must lie in (0, 1] (1 = every class)")
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


def _check_fr_only(config: TrainConfig) -> None:
    """An empty regression half goes with loss.mode fr (no regression at all) or data.batch_mode
    single (the regression on the one batch); the variance table (kept for monitoring) can only
    follow the FR half's CCS without a regression half."""
    mode, reg, single = config.loss.mode, config.data.reg_batch, config.data.batch_mode == "single"
    _check(
        mode != "fr" or reg == 0,
        f"loss.mode fr trains face recognition only, with no regression half: set data.reg_batch: 0 "
        f"(it is {reg})",
    )
    _check(
        not single or reg == 0,
        f"data.batch_mode single trains both losses on one batch of data.fr_batch images: set "
        f"data.reg_batch: 0 (it is {reg})",
    )
    _check(
        not single or mode != "fr",
        "data.batch_mode single trains the regression loss on the one batch; loss.mode fr has none "
        "(use batch_mode: split)",
    )
    _check(
        mode == "fr" or reg > 0 or single,
        f"data.reg_batch: 0 leaves no regression half, which only loss.mode fr or data.batch_mode single "
        f"trains without (loss.mode is {mode}): set data.reg_batch > 0, loss.mode: fr or "
        f"data.batch_mode: single",
    )
    _check(
        mode != "fr" or config.variance.update_from == "fr",
        "variance.update_from: reg needs a regression half; loss.mode fr has none (use update_from: fr)",
    )


def validate_for_launch(config: TrainConfig, world_size: int) -> None:
    """Everything checkable before a job starts: ranges, the dataset on disk, the batch layout.

    The dataset must be complete (its `dataset.json` exists) and its class count must agree
    with `data.num_classes` when that is set; the global batches must split evenly over
    `world_size` processes and one step must fit in an epoch (`BatchLayout`).
    """
    from data_prep.dataset import load_dataset_info  # pipeline → data_prep, lazily
    from data_prep.errors import DataError

    validate_ranges(config)
    try:
        info = load_dataset_info(Path(config.data.dataset))
    except DataError as exc:
        raise ConfigError(f"data.dataset: {exc}") from None
    if config.data.num_classes and config.data.num_classes != info.num_classes:
        raise ConfigError(
            f"data.num_classes: {config.data.num_classes} disagrees with the dataset "
            f"{config.data.dataset} ({info.num_classes} classes)"
        )
    BatchLayout.of(config.data, world_size, info.num_images)


# --------------------------------------------------------------------------- the batch layout


@dataclass(frozen=True)
class BatchLayout:
    """How each training step's images split into halves and ranks, and how many steps an epoch has.

    Global step s takes `global_batch` = `fr_batch` + `reg_batch` images of the epoch's order:
    the FR half, then the regression half (empty when `reg_batch` is 0: loss.mode fr, or
    data.batch_mode single, whose one batch is the FR half). Rank r of
    `world_size` takes the r-th contiguous slice of each half: `fr_per_rank` images from `fr_offset`
    of the FR half and `reg_per_rank` from `reg_offset` of the regression half, `rank_batch` in all.
    An epoch is `steps_per_epoch` whole global steps (the remainder of the `num_images` is dropped),
    the same on every rank, so 1 and N processes train on the same global batches. Built once per
    process (`BatchLayout.of`) and handed to the sampler, the loader, the trainer and the monitor.
    """

    fr_batch: int  # global FR half (data.fr_batch)
    reg_batch: int  # global regression half (data.reg_batch)
    num_images: int  # of the training set
    world_size: int = 1
    rank: int = 0
    dataset: str = "the training set"  # its folder, for messages
    # derived, in __post_init__
    global_batch: int = field(init=False)
    fr_per_rank: int = field(init=False)
    reg_per_rank: int = field(init=False)
    rank_batch: int = field(init=False)
    fr_offset: int = field(init=False)
    reg_offset: int = field(init=False)
    steps_per_epoch: int = field(init=False)

    @classmethod
    def of(cls, data: DataConfig, world_size: int, num_images: int, rank: int = 0) -> BatchLayout:
        """The layout of `data`'s batches for process `rank` of `world_size` on `num_images` images."""
        return cls(data.fr_batch, data.reg_batch, num_images, world_size, rank, data.dataset)

    def __post_init__(self) -> None:
        world = self.world_size
        _check(world >= 1, f"world size {world} must be >= 1")
        _check(self.fr_batch > 0, f"data.fr_batch: {self.fr_batch} must be positive")
        _check(self.reg_batch >= 0, f"data.reg_batch: {self.reg_batch} must be >= 0")
        for key, value in (("data.fr_batch", self.fr_batch), ("data.reg_batch", self.reg_batch)):
            _check(value % world == 0, f"{key}: {value} is not divisible by the world size {world}")
        _check(0 <= self.rank < world, f"rank {self.rank} is outside [0, {world})")
        fr_local, reg_local = self.fr_batch // world, self.reg_batch // world
        derived = {
            "global_batch": self.fr_batch + self.reg_batch,
            "fr_per_rank": fr_local,
            "reg_per_rank": reg_local,
            "rank_batch": fr_local + reg_local,
            "fr_offset": self.rank * fr_local,
            "reg_offset": self.rank * reg_local,
            "steps_per_epoch": self.num_images // (self.fr_batch + self.reg_batch),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here
        _check(
            self.steps_per_epoch > 0,
            f"data.fr_batch + data.reg_batch = {self.fr_batch} + {self.reg_batch}: the {self.num_images} "
            f"images of {self.dataset} cannot fill one step",
        )


def replace_section(config: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """A copy of `config` with some fields of some sections replaced, re-checked."""
    tree = config_to_dict(config)
    for section, values in sections.items():
        if section not in tree:
            raise ConfigError(f"unknown config section {section}")
        tree[section].update(values)
    return config_from_dict(tree)
