"""What a training run reports: step metrics, a progress bar, MLflow run, plots.

Every rank calls the same methods at the same steps (some gather sharded state);
only rank 0 talks to MLflow, draws the bar and writes plots. A tracking hiccup
after MLflow's own retries costs a log line, never the job.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.checkpoint import TrainingPosition
from pipeline.config import BatchLayout, TrainConfig, dump_config, flatten_config
from pipeline.method.objective import IGFIQAObjective, ObjectiveOutput
from pipeline.method.variance_table import z_score_weights
from pipeline.parallel.env import DistEnv
from pipeline.training.schedules import StepValues

log = logging.getLogger(__name__)

TRACKING_OFF = "off"  # run.tracking_uri that turns MLflow off (log lines only)

# metrics drawn in training_curves.png, in panel order
CURVE_METRICS = (
    "loss_arc",
    "loss_ig",
    "cr_mean",
    "quality_mean",
    "class_weight_mean",
    "class_weight_zero_frac",
    "variance_mean",
    "alpha",
    "lr",
    "images_per_s",
    "data_wait_frac",
    "epoch",  # not a panel: where the epoch lines go
)


class StepMeter:
    """Sums of one rank's step outputs between two log points, kept on the device (no sync per step).

    Sample and step counts are known on the host and counted there; only the values the
    step computes are added on the device, and read once per log point.
    """

    # [loss_arc, loss_ig, loss_total, Σcr, Σquality, Σŵ, Σfr_ccs]
    _FIELDS = 7

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(self._FIELDS, dtype=torch.float64, device=self.device)
        self.counts = [0.0, 0.0, 0.0]  # n_reg, n_fr, steps
        self.alpha = 0.0
        self.wait_s = 0.0
        self.images = 0
        self.started = time.perf_counter()

    def data_wait(self, seconds: float) -> None:
        """Time this rank spent waiting for the next batch."""
        self.wait_s += seconds

    @torch.no_grad()
    def add(
        self, out: ObjectiveOutput, reg_quality: torch.Tensor, images_per_step: int, alpha: float
    ) -> None:
        """Accumulate one step's (detached) outputs and the regression half's predicted quality."""
        values = torch.stack(
            [
                out.loss_arc.detach().double(),
                out.loss_ig.detach().double(),
                out.total.detach().double(),
                out.cr.detach().double().sum(),
                reg_quality.detach().double().sum(),
                out.weights.detach().double().sum(),
                out.fr_ccs.detach().double().sum(),
            ]
        )
        self.sums += values
        self.counts[0] += out.cr.numel()
        self.counts[1] += out.fr_ccs.numel()
        self.counts[2] += 1
        self.alpha = alpha
        self.images += images_per_step

    def collect(self) -> dict[str, float]:
        """Averages since the last call over all ranks (collective), then reset."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        host = torch.tensor([*self.counts, self.wait_s, wall], dtype=torch.float64)
        vector = torch.cat([self.sums, host.to(self.device)])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(vector)
        (arc, ig, total, cr, quality, weights, fr_ccs, n_reg, n_fr, steps, wait, wall_sum) = vector.tolist()
        steps_per_rank = steps / world
        # without a regression half (loss.mode fr) there is no CR, predicted quality or sample
        # weight to average: those metrics are left out rather than logged as zeros
        regression = (
            {"cr_mean": cr / n_reg, "quality_mean": quality / n_reg, "sample_weight_mean": weights / n_reg}
            if n_reg
            else {}
        )
        out = {
            "loss_arc": arc / steps,
            "loss_ig": ig / steps,
            "loss_total": total / steps,
            **regression,
            "fr_ccs_mean": fr_ccs / max(n_fr, 1.0),
            "alpha": self.alpha,
            "images_per_s": self.images / wall,
            "data_wait_frac": wait / wall_sum,
            "seconds_per_step": wall / max(steps_per_rank, 1.0),
        }
        self._reset()
        return out


def _full_table(objective: IGFIQAObjective) -> torch.Tensor | None:
    """The unsharded variance table v on rank 0, float64 on the CPU (collective; None elsewhere)."""
    full = objective.variance.full_state(dst=0)
    return None if full is None else full.double().cpu()


def _full_class_weights(objective: IGFIQAObjective) -> np.ndarray | None:
    """ŵ of every class from the unsharded variance table on rank 0 (collective; None elsewhere)."""
    values = _full_table(objective)
    if values is None:
        return None
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    return z_score_weights(values, mean, std).numpy()


def class_weight_stats(objective: IGFIQAObjective) -> dict[str, float]:
    """μ_v, σ_v and a summary of the class weights (paper Fig. 1b) on rank 0; {} elsewhere. Collective."""
    values = _full_table(objective)
    if values is None:
        return {}
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    weights = z_score_weights(values, mean, std).numpy()
    p10, p50, p90 = np.percentile(weights, [10, 50, 90])
    return {
        "variance_mean": mean,
        "variance_std": std,
        "class_weight_mean": float(weights.mean()),
        "class_weight_zero_frac": float(np.mean(weights <= 1e-6)),
        "class_weight_p10": float(p10),
        "class_weight_p50": float(p50),
        "class_weight_p90": float(p90),
    }


def _hosts(env: DistEnv) -> list[str]:
    name = env.hostname or socket.gethostname()
    if not dist.is_initialized():
        return [name]
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return sorted(set(map(str, names)))


def _duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s: how long the rest of training will take at the current pace."""
    whole = max(round(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TrainingMonitor:
    """Rank 0's MLflow run, log lines and progress bar for one call of `train()`.

    The loop calls `after_step` once per step; every `run.log_every` steps (and at the
    last) it averages the step outputs over ranks and logs them (collective then).
    """

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        objective: IGFIQAObjective,
        *,
        layout: BatchLayout,
        total_steps: int,
        run_id: str,
        start_step: int,
        device: torch.device,
    ) -> None:
        self.config, self.env, self.total = config, env, total_steps
        self.objective = objective
        self.meter = StepMeter(device)
        self.images_per_step = layout.global_batch  # every rank counts the global step's images
        self.last_metrics: dict[str, float] = {}
        self.plots_dir = Path(config.run.dir) / "plots"
        hosts = _hosts(env)  # collective
        self.tracker = None
        self.run_id = run_id
        self._bar = None
        if not env.is_main:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=config.run.name, unit="step", dynamic_ncols=True
            )
        if config.run.tracking_uri == TRACKING_OFF:
            log.info("MLflow tracking is off (run.tracking_uri: off): metrics go to the log only")
            return
        from pipeline.tracking.store import RunTracker, resolve_tracking_uri

        uri = resolve_tracking_uri(config.run.tracking_uri)
        self.tracker = RunTracker.start(
            tracking_uri=uri,
            experiment=config.run.experiment,
            run_name=config.run.name,
            run_id=run_id,
            tags={"kind": "train"},
        )
        self.run_id = self.tracker.run_id
        self.tracker.set_tags(self._tags(hosts, start_step))
        self._log_params()
        log.info("MLflow run %s at %s (%s)", self.run_id, uri, "continued" if run_id else "new")

    def _tags(self, hosts: list[str], start_step: int) -> dict[str, Any]:
        from data_prep.dataset import dataset_fingerprint
        from pipeline.checkpoint import code_version

        tags: dict[str, Any] = {
            "code_version": code_version(),
            "world_size": self.env.world_size,
            "hosts": ",".join(hosts),
            "device": "cuda" if torch.cuda.is_available() and self.config.run.device != "cpu" else "cpu",
            "dataset": self.config.data.dataset,
            "dataset_fingerprint": dataset_fingerprint(Path(self.config.data.dataset)),
            "run_dir": self.config.run.dir,
            "loss_mode": self.config.loss.mode,
            f"attempt_started_at_step_{start_step}": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.env.job_id:
            tags["slurm_job_id"] = self.env.job_id
        return tags

    def _log_params(self) -> None:
        assert self.tracker is not None
        try:
            self.tracker.log_params(flatten_config(self.config))
        except Exception as exc:  # MLflow refuses to change a param of an existing run
            log.warning("config differs from the run's logged params (%s); stored as an artifact", exc)
            self.tracker.log_text(dump_config(self.config), f"config-changed-{int(time.time())}.yaml")

    # ------------------------------------------------------------------ per step

    def data_wait(self, seconds: float) -> None:
        """Time this rank waited for its next batch."""
        self.meter.data_wait(seconds)

    def after_step(
        self, position: TrainingPosition, out: ObjectiveOutput, reg_quality: torch.Tensor, values: StepValues
    ) -> dict[str, float] | None:
        """Accumulate one step on the device; every `run.log_every` steps (and the last) average over
        ranks, log, and return the averages, the same on every rank (collective then)."""
        self.meter.add(out, reg_quality, self.images_per_step, values.alpha)
        step = position.global_step
        averages = None
        if step % self.config.run.log_every == 0 or step == self.total:
            averages = self.meter.collect()
            weights = class_weight_stats(self.objective)  # collective
            self.log_step(step, position.epoch, values.lr, averages, weights)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        return averages

    def log_step(
        self, step: int, epoch: int, lr: float, meter: dict[str, float], weights: dict[str, float]
    ) -> None:
        """Log one point of every metric (rank 0; the arguments were computed collectively)."""
        if not self.env.is_main:
            return
        metrics = {**meter, **weights, "lr": lr, "epoch": float(epoch)}
        self.last_metrics = metrics
        regression = (
            f"loss_ig {metrics['loss_ig']:.5f} cr {metrics['cr_mean']:.3f} " if "cr_mean" in metrics else ""
        )
        line = (
            f"step {step}/{self.total} epoch {epoch} loss_arc {metrics['loss_arc']:.4f} {regression}"
            f"w0 {metrics.get('class_weight_zero_frac', 0.0):.1%} alpha {metrics['alpha']:.4f} lr {lr:.4g} "
            f"{metrics['images_per_s']:.1f} img/s data-wait {metrics['data_wait_frac']:.1%} "
            f"ETA {_duration(metrics.get('seconds_per_step', 0.0) * (self.total - step))}"
        )
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"arc {metrics['loss_arc']:.3f} ig {metrics['loss_ig']:.4f} {metrics['images_per_s']:.0f} img/s"
            )
        else:
            log.info(line)
        if self.tracker is not None:
            self._safely(lambda: self.tracker.log_metrics(metrics, step), "log_metrics")

    def log_validation(self, step: int, metrics: dict[str, float], *, best: Any = None) -> None:
        """Log the validation metrics at `step` (rank 0), and the best-so-far as tags."""
        if not self.env.is_main or not metrics:
            return
        line = ", ".join(
            f"{k.removeprefix('val.')} {v:.4g}" for k, v in sorted(metrics.items()) if not k.endswith(".fmr")
        )
        log.info("validation at step %d: %s", step, line)
        self.last_metrics.update(metrics)
        if self.tracker is None:
            return
        tracker = self.tracker
        self._safely(lambda: tracker.log_metrics(metrics, step), "log_metrics")
        if best is not None and best.value is not None:
            tags = {"best_metric": best.metric, "best_value": best.value, "best_step": best.step}
            self._safely(lambda: tracker.set_tags(tags), "set_tags")

    def _safely(self, action: Any, what: str) -> None:
        try:
            action()
        except Exception as exc:
            log.warning("MLflow %s failed after retries: %s", what, exc)

    # ------------------------------------------------------------------ milestones

    def epoch_end(self, epoch: int) -> None:
        """Histogram of the class weights after each epoch (collective)."""
        weights = _full_class_weights(self.objective)
        if weights is None or self.tracker is None:
            return
        from pipeline.training.plots import plot_weight_histogram

        path = plot_weight_histogram(
            weights,
            self.plots_dir / f"weights-epoch-{epoch:03d}.png",
            title=f"class weights after epoch {epoch}",
        )
        self._safely(lambda: self.tracker.log_artifact(path, "weights"), "log_artifact")

    def finish(self, last_checkpoint: str, *, completed: bool) -> None:
        """Final artifacts (collective): config, checkpoint reference, weight histogram, training curves."""
        weights = _full_class_weights(self.objective)
        if self.tracker is None or weights is None:
            return
        tracker = self.tracker
        self._safely(lambda: self._final_artifacts(last_checkpoint, weights), "final artifacts")
        self._safely(lambda: tracker.finish("FINISHED" if completed else "KILLED"), "finish")

    def _final_artifacts(self, last_checkpoint: str, weights: np.ndarray) -> None:
        from pipeline.training.plots import plot_training_curves, plot_weight_histogram

        tracker = self.tracker
        assert tracker is not None
        tracker.log_text(dump_config(self.config), "config.yaml")
        if last_checkpoint:
            tracker.log_text(f"{last_checkpoint}\n", "checkpoint.txt")
            tracker.set_tags({"checkpoint": last_checkpoint})
        hist = plot_weight_histogram(
            weights, self.plots_dir / "class_weights.png", title="class weights (final)"
        )
        tracker.log_artifact(hist)
        np.save(self.plots_dir / "class_weights.npy", weights)
        tracker.log_artifact(self.plots_dir / "class_weights.npy")
        validation = sorted(
            k for k in tracker.metric_keys() if k.startswith("val.") and not k.endswith(".fmr")
        )
        history = {name: tracker.metric_history(name) for name in (*CURVE_METRICS, *validation)}
        if any(history.values()):
            resumed = sorted(
                int(key.rsplit("_", 1)[1])
                for key in tracker.tags()
                if key.startswith("attempt_started_at_step_")
            )
            curves = plot_training_curves(
                history,
                self.plots_dir / "training_curves.png",
                title=self.config.run.name,
                resumed_at=resumed,
            )
            tracker.log_artifact(curves)

    def interrupted(self, step: int) -> None:
        """A signal stopped the run after a checkpoint: the run is continued by the next attempt."""
        if self.tracker is None:
            return
        self._safely(lambda: self.tracker.set_tags({"last_interruption_step": step}), "set_tags")
        self._safely(self.tracker.pause, "pause")

    def failed(self) -> None:
        if self.tracker is not None:
            self._safely(lambda: self.tracker.finish("FAILED"), "finish")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
