"""Validation during training, and the best checkpoint it selects.

Every `run.validate_every` steps and at the end, rank 0 evaluates the model as it is on
the converted verification sets under `run.validation_data` (the folder `igfiqa eval
--data` takes): verification accuracy with its own backbone, and EDC pAUC / ERC AUC of
its quality scores at one FMR, each beside the random-quality reference of the same
pairs. Metrics are named `val.<set>.<metric>`; `run.select_by` names the one that picks
`best.ckpt` (accuracy: higher is better; the curve areas and their ratios to random:
lower is better). None of the peers (arcface_torch, CR-FIQA) selects FIQA checkpoints
by EDC; a FIQA model's best step for FR accuracy is not its best for quality.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.evaluation.evaluate import evaluate_set, find_evaluation_sets, load_verification_set
from pipeline.evaluation.options import EvalOptions

log = logging.getLogger(__name__)

METHOD = "quality"  # the quality column's name in the validation evaluation
HIGHER_IS_BETTER = frozenset({"accuracy"})
LOWER_IS_BETTER = frozenset({"edc_pauc", "erc_auc", "edc_pauc_vs_random", "erc_auc_vs_random"})
METRICS = HIGHER_IS_BETTER | LOWER_IS_BETTER


def metric_kind(name: str) -> str:
    """The metric part of `val.<set>.<metric>`; ConfigError for a name that is not one."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "val" or parts[-1] not in METRICS:
        raise ConfigError(
            f"run.select_by: {name!r} is not a validation metric; use val.<set>.<metric> with <metric> "
            f"one of {', '.join(sorted(METRICS))} (e.g. val.mixed.edc_pauc)"
        )
    return parts[-1]


class Validator:
    """The verification sets of `data_dir`, loaded once; `__call__(model)` gives the metrics."""

    def __init__(
        self, data_dir: str | Path, *, fmr: float, device: torch.device, batch_size: int = 256
    ) -> None:
        self.sets = [load_verification_set(path) for path in find_evaluation_sets(data_dir)]
        self.options = EvalOptions(
            batch_size=batch_size, device=str(device), fmrs=(fmr,) if fmr > 0 else None, progress=False
        )

    @property
    def names(self) -> list[str]:
        return [vset.name for vset in self.sets]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """`val.<set>.<metric>` for every set, with the model in eval mode (restored afterwards)."""
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        try:
            for vset in self.sets:
                out = evaluate_set(model, vset, self.options, method=METHOD)
                ours = next(r for r in out.quality.results if r.method == METHOD)
                summary = ours.summary()
                prefix = f"val.{vset.name}"
                metrics[f"{prefix}.accuracy"] = out.verification.accuracy
                for key in ("edc_pauc", "erc_auc", "edc_pauc_vs_random", "erc_auc_vs_random"):
                    metrics[f"{prefix}.{key}"] = float(summary[key])
                metrics[f"{prefix}.fmr"] = ours.threshold.fmr_target
        finally:
            model.train(was_training)
        return metrics


@dataclass
class BestCheckpoint:
    """The best value of `metric` so far and the step that reached it (saved in every checkpoint)."""

    metric: str
    value: float | None = None
    step: int = -1

    def improves(self, metrics: dict[str, float]) -> bool:
        """True when `metrics` beats the best so far (a NaN never does)."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        higher = metric_kind(self.metric) in HIGHER_IS_BETTER
        return value > self.value if higher else value < self.value

    def record(self, metrics: dict[str, float], step: int) -> None:
        self.value, self.step = float(metrics[self.metric]), step

    def as_dict(self) -> dict[str, object]:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    @classmethod
    def restored(cls, metric: str, saved: dict | None) -> BestCheckpoint:
        """The best so far from a checkpoint's record (kept only when it follows the same metric)."""
        if saved and saved.get("metric") == metric:
            value = saved.get("value")
            return cls(metric, None if value is None else float(value), int(saved.get("step", -1)))
        return cls(metric)
