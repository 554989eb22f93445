"""The IG-FIQA training loop, as in the paper's Fig. 2.

    for each step:
        FR half (clean), regression half (degraded)   ← DALI (pipeline.data.loader)
        LR and α of this step                          ← pipeline.training.schedules
        embeddings, quality = backbone + head          (DDP; FR half, then regression half: separate
                                                        forwards, BN stats from the FR half only)
        ArcFace on the FR half                         ┐
        CCS, NNCCS → CR on the regression half         │ pipeline.method.objective
        variance table ← 1 − CCS; class weights ŵ      │ (sharded classifier and table)
        L = L_Arc + λ · Σ ŵ · smoothL1(CR − quality)   ┘
        backward, clip, SGD step (backbone+head; the classifier shard has its own optimizer)
        metrics every run.log_every steps              ← pipeline.training.monitor
        checkpoint when due or on a signal             ← pipeline.training.checkpointer

`train(config, env)` runs on every process of the job (gloo on CPU, NCCL on GPU).
It resumes by itself from `RUN/checkpoints/last.ckpt` (any world size: the
classifier and the variance table are saved unsharded, `pipeline.checkpoint`).
When `stop_requested()` turns non-zero on any rank (a SLURM signal) every rank
saves at the end of the same step and `train` returns "interrupted".
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.dataset import dataset_fingerprint, load_dataset_info
from pipeline.checkpoint import (
    TrainingPosition,
    build_training_state,
    check_resumable,
    load_resume_checkpoint,
    mark_best,
    restore_training,
    rng_state,
    save_checkpoint,
)
from pipeline.config import BatchLayout, ConfigError, TrainConfig, validate_ranges
from pipeline.data.loader import StepBatch, TrainLoader
from pipeline.method.objective import ObjectiveOutput
from pipeline.parallel.env import DistEnv, resolve_device
from pipeline.training.checkpointer import PeriodicCheckpointer, StopRequest
from pipeline.training.monitor import TrainingMonitor
from pipeline.training.schedules import StepValues, TrainingSchedule, total_steps
from pipeline.training.step import TrainStep
from pipeline.training.validation import BestCheckpoint, Validator, metric_kind

log = logging.getLogger(__name__)

COMPLETED, INTERRUPTED = "completed", "interrupted"


def _check_select_by(select_by: str, sets: list[str]) -> None:
    """run.select_by must name a validation metric of one of the sets found."""
    if not select_by:
        return
    metric_kind(select_by)
    name = select_by.split(".")[1]
    if name not in sets:
        raise ConfigError(f"run.select_by: {select_by!r} names set {name!r}; the validation sets are {sets}")


class NonFiniteTrainingError(RuntimeError):
    """The loss or the weights became NaN/infinite: training stops, the last good checkpoint stays."""


@dataclass
class TrainResult:
    """How a call of `train()` ended (rank 0's view; other ranks carry the same step counts)."""

    status: str  # "completed" | "interrupted"
    global_step: int
    epoch: int
    checkpoint: str  # the last checkpoint written ("" on ranks other than 0)
    mlflow_run_id: str
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged metrics

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (what submitit pickles back to the submitter)."""
        return asdict(self)


def _seed_everything(config: TrainConfig) -> None:
    torch.manual_seed(config.run.seed)
    if config.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the job's process group (gloo on CPU, NCCL on GPU); True if this call created it."""
    if env.world_size == 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=env.collective_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    log.info(
        "rank %d/%d joined the %s process group at %s (collective timeout %g s)",
        env.rank,
        env.world_size,
        backend,
        env.init_method,
        env.collective_timeout_s,
    )
    return True


def train(
    config: TrainConfig,
    env: DistEnv,
    *,
    stop_requested: Callable[[], int] | None = None,
    mlflow_run_id: str = "",
) -> TrainResult:
    """Train (or continue training) as process `env.rank` of `env.world_size`; collective.

    `stop_requested()` returns a `StopRequest` (NONE to go on; SAVE_AND_EXIT or
    SAVE_AND_REQUEUE to save and return "interrupted": the caller requeues). `mlflow_run_id` continues that run unless the
    checkpoint being resumed names one.
    """
    validate_ranges(config)
    device = resolve_device(config.run.device, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created_group = _init_process_group(env, device)
    try:
        trainer = Trainer(config, env, device, stop_requested or (lambda: StopRequest.NONE), mlflow_run_id)
        return trainer.run()
    finally:
        if created_group:
            dist.destroy_process_group()


class Trainer:
    """The state of one training process; `run()` is the loop, `step()` one optimizer step."""

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        device: torch.device,
        stop_requested: Callable[[], int],
        mlflow_run_id: str,
    ) -> None:
        self.config, self.env, self.device = config, env, device
        _seed_everything(config)
        self.run_dir = Path(config.run.dir)
        self.dataset_fingerprint = dataset_fingerprint(Path(config.data.dataset))
        num_images = load_dataset_info(Path(config.data.dataset)).num_images
        self.layout = BatchLayout.of(config.data, env.world_size, num_images, env.rank)
        self.loader = TrainLoader(config.data, self.layout, device=device)
        self.steps_per_epoch = self.layout.steps_per_epoch
        self.total = total_steps(self.steps_per_epoch, config.optim)
        self.schedule = TrainingSchedule(config.optim, config.variance, self.steps_per_epoch, self.total)

        self.train_step = TrainStep(config, self.loader.num_classes, device, env.world_size)
        step = self.train_step
        self.model, self.ddp_model, self.objective = step.model, step.ddp_model, step.objective
        self.model_optimizer, self.classifier_optimizer = step.model_optimizer, step.classifier_optimizer

        self.position = TrainingPosition()
        self.last_checkpoint = ""
        self.validator = None
        self.best = BestCheckpoint(config.run.select_by) if config.run.select_by else None
        if config.run.validation_data and env.is_main:
            self.validator = Validator(
                config.run.validation_data, fmr=config.run.validation_fmr, device=device
            )
            _check_select_by(config.run.select_by, self.validator.names)
        resumed_run_id = self._resume()
        # a CPU (gloo) group for the per-step stop poll: it must not synchronise the GPU stream
        control_group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=env.collective_timeout_s))
            if env.world_size > 1 and device.type == "cuda"
            else None
        )
        self.checkpointer = PeriodicCheckpointer(
            self.save,
            every_steps=config.run.checkpoint_every_steps,
            every_minutes=config.run.checkpoint_every_minutes,
            stop_requested=stop_requested,
            is_main=env.is_main,
            world_size=env.world_size,
            group=control_group,
            last_saved_step=self.position.global_step if self.last_checkpoint else -1,
        )
        self.monitor = TrainingMonitor(
            config,
            env,
            self.objective,
            layout=self.layout,
            total_steps=self.total,
            run_id=resumed_run_id or mlflow_run_id,
            start_step=self.position.global_step,
            device=device,
        )
        self.mlflow_run_id = self.monitor.run_id

    # ------------------------------------------------------------------ resume / save

    def _resume(self) -> str:
        """Load `last.ckpt` if the run directory has one; returns the MLflow run id it names."""
        found = load_resume_checkpoint(self.run_dir)
        if found is None:
            return ""
        path, state = found
        check_resumable(path, state, self.config, dataset_fingerprint=self.dataset_fingerprint)
        self.position = restore_training(
            state,
            model=self.model,
            model_optimizer=self.model_optimizer,
            sharded=self.objective,
            classifier_optimizer=self.classifier_optimizer,
            device=self.device,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        self.last_checkpoint = str(path)
        if self.best is not None:
            self.best = BestCheckpoint.restored(self.best.metric, state.get("best"))
        saved_world = int(state["world_size"])
        if saved_world != self.env.world_size:
            log.warning(
                "resuming a checkpoint written by %d process(es) on %d: classifier, its momentum and the "
                "variance table are re-sharded by class range",
                saved_world,
                self.env.world_size,
            )
        if self.env.is_main:
            log.info(
                "resumed from %s: epoch %d, step %d of the epoch, global step %d/%d",
                path,
                self.position.epoch,
                self.position.step_in_epoch,
                self.position.global_step,
                self.total,
            )
        return str(state["mlflow_run_id"])

    def _check_finite(self) -> None:
        """Collective: stop (NonFiniteTrainingError) when any rank holds a NaN/inf weight."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.objective.parameters()]
        tensors.append(self.objective.variance.values)
        bad = torch.stack([(~torch.isfinite(t)).any() for t in tensors]).any().to(torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self._diverged("the weights hold NaN or infinite values")

    def _diverged(self, what: str) -> None:
        kept = self.last_checkpoint or "none was written yet"
        raise NonFiniteTrainingError(
            f"training diverged at step {self.position.global_step}: {what}. Nothing new was saved; "
            f"the last good checkpoint is {kept}. Lower optim.lr or raise optim.warmup_epochs, "
            "check the data, then resume (or start afresh in another run.dir)"
        )

    def save(self, reason: str) -> None:
        """Collective: gather the sharded state to rank 0, which writes the checkpoint atomically.

        Refuses to save non-finite weights: the last checkpoint stays the last good one.
        """
        self._check_finite()
        sharded = self.objective.full_state(optimizer=self.classifier_optimizer, dst=0)
        rng_per_rank: list[Any] = [rng_state(self.device)]
        if self.env.world_size > 1:
            gathered: list[Any] | None = [None] * self.env.world_size if self.env.is_main else None
            dist.gather_object(rng_per_rank[0], gathered, dst=0)
            rng_per_rank = gathered or []
        if self.env.is_main:
            state = build_training_state(
                config=self.config,
                model=self.model,
                model_optimizer=self.model_optimizer,
                sharded=sharded,
                position=self.position,
                scheduler={
                    "kind": "multistep",
                    "base_lr": self.config.optim.lr,
                    "lr": self.schedule.at(self.position.global_step).lr,
                    "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total,
                },
                mlflow_run_id=self.mlflow_run_id,
                world_size=self.env.world_size,
                reason=reason,
                device=self.device,
                rng_per_rank=rng_per_rank,
                extra={
                    "dataset_fingerprint": self.dataset_fingerprint,
                    "best": self.best.as_dict() if self.best is not None else None,
                },
            )
            path = save_checkpoint(state, self.run_dir, keep=self.config.run.keep_checkpoints)
            self.last_checkpoint = str(path)
            log.info("checkpoint (%s) at step %d: %s", reason, self.position.global_step, path)
        if self.env.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ one step

    def step(self, batch: StepBatch, values: StepValues) -> tuple[ObjectiveOutput, torch.Tensor]:
        """One optimizer step on this rank's halves of `batch` (Fig. 2; `TrainStep`)."""
        return self.train_step(batch.fr.images, batch.fr.labels, batch.reg.images, batch.reg.labels, values)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        """Train from the current position to the end (or to a stop request)."""
        pos = self.position
        if pos.global_step >= self.total:
            log.info("nothing to do: the checkpoint is at step %d of %d", pos.global_step, self.total)
            self.monitor.finish(self.last_checkpoint, completed=True)
            return self._result(COMPLETED)
        self.train_step.train()
        try:
            for batch in self._batches():
                values = self.schedule.at(pos.global_step)
                out, reg_quality = self.step(batch, values)
                pos.global_step += 1
                pos.step_in_epoch = batch.step + 1
                averages = self.monitor.after_step(pos, out, reg_quality, values)
                if averages is not None and not math.isfinite(averages["loss_total"]):
                    self._diverged(f"the mean loss of the last steps is {averages['loss_total']}")
                if self._validation_due(pos.global_step):
                    self._validate()
                stop = self.checkpointer.step(pos.global_step)
                if stop:
                    self.monitor.interrupted(pos.global_step)
                    return self._result(INTERRUPTED)
            self.checkpointer.finish(pos.global_step)
            self.monitor.finish(self.last_checkpoint, completed=True)
            return self._result(COMPLETED)
        except BaseException:
            self.monitor.failed()
            raise
        finally:
            self.loader.close()
            self.monitor.close()

    def _validation_due(self, step: int) -> bool:
        every = self.config.run.validate_every
        return bool(self.config.run.validation_data) and (step == self.total or (every and step % every == 0))

    def _validate(self) -> None:
        """Collective: rank 0 validates (the others wait for its verdict), every rank saves together
        when `run.select_by` improved, and best.ckpt points at that checkpoint."""
        step = self.position.global_step
        metrics = self.validator(self.model) if self.validator is not None else {}
        improved = self.best is not None and self.env.is_main and self.best.improves(metrics)
        if self.env.is_main:
            if improved:
                self.best.record(metrics, step)
            self.monitor.log_validation(step, metrics, best=self.best)
        if self.env.world_size > 1:
            flag = torch.tensor([int(improved)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.checkpointer.group)
            improved = bool(flag[0])
        if not improved:
            return
        self.checkpointer.save(step, "best")  # the checkpointer saves this step no second time
        if self.env.is_main:
            best = mark_best(self.last_checkpoint)
            log.info(
                "best checkpoint so far (%s = %.5g at step %d): %s",
                self.best.metric,
                self.best.value,
                step,
                best,
            )

    def _batches(self) -> Iterator[StepBatch]:
        """This rank's batches from the current position to the end of training, epoch after epoch."""
        pos = self.position
        while pos.global_step < self.total:
            self.loader.set_epoch(pos.epoch, pos.step_in_epoch)
            batches = iter(self.loader)
            while pos.global_step < self.total:
                wait_start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                self.monitor.data_wait(time.perf_counter() - wait_start)
                yield batch
            if pos.step_in_epoch >= self.steps_per_epoch:
                self.monitor.epoch_end(pos.epoch)
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0

    def _result(self, status: str) -> TrainResult:
        return TrainResult(
            status=status,
            global_step=self.position.global_step,
            epoch=self.position.epoch,
            checkpoint=self.last_checkpoint,
            mlflow_run_id=self.mlflow_run_id,
            metrics=dict(self.monitor.last_metrics),
        )
