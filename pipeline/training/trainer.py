"""The IG-FIQA training loop, as in the paper's Fig. 2.

    for each step:
        FR half (clean), regression half (degraded)   ← DALI (pipeline.data.loader)
        embeddings, quality = backbone + head          (FR half, then regression half: separate
                                                        forwards, BN stats from the FR half only)
        ArcFace on the FR half                         ┐
        CCS, NNCCS → CR on the regression half         │ pipeline.method.objective
        variance table ← 1 − CCS; class weights ŵ      │ (sharded classifier and table)
        L = L_Arc + λ · Σ ŵ · smoothL1(CR − quality)   ┘
        backward, clip, SGD step (backbone+head; the classifier shard has its own optimizer)

`train(config, env)` runs on every process of the job (gloo on CPU, NCCL on GPU).
It resumes by itself from `RUN/checkpoints/last.ckpt` (any world size: the
classifier and the variance table are saved unsharded), saves every N steps / M
minutes, and — when `stop_requested()` turns non-zero on any rank (a SLURM
signal) — saves at the end of the current step on every rank together and
returns "interrupted". Rank 0 logs to MLflow (`pipeline.training.monitor`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    code_version,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    validate_for_world,
    validate_ranges,
)
from pipeline.data.loader import TrainLoader
from pipeline.method.model import build_model
from pipeline.method.objective import IGFIQAObjective, ObjectiveOutput
from pipeline.parallel.env import DistEnv
from pipeline.training.monitor import StepMeter, TrainingMonitor, class_weight_stats
from pipeline.training.schedules import lr_factor, total_steps, training_progress

log = logging.getLogger(__name__)

COMPLETED, INTERRUPTED = "completed", "interrupted"


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


@dataclass
class _Position:
    """Where training stands: resumes from a checkpoint, advances by one per step."""

    epoch: int = 0
    step_in_epoch: int = 0  # the next step of `epoch` to run
    global_step: int = 0  # optimizer steps done


def select_device(requested: str, local_rank: int) -> torch.device:
    """`run.device`: "auto" takes this process's GPU when CUDA is available, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' but CUDA is not available on this machine (use auto or cpu)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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
        timeout=timedelta(minutes=30),
        device_id=device if device.type == "cuda" else None,
    )
    log.info(
        "rank %d/%d joined the %s process group at %s", env.rank, env.world_size, backend, env.init_method
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

    `stop_requested()` returns 0 to go on, 1 to save and stop, 2 to save and stop for a
    requeue (the caller requeues). `mlflow_run_id` continues that run unless the
    checkpoint being resumed names one.
    """
    validate_ranges(config)
    validate_for_world(config, env.world_size)
    device = select_device(config.run.device, env.local_rank)
    created_group = _init_process_group(env, device)
    try:
        trainer = _Trainer(config, env, device, stop_requested or (lambda: 0), mlflow_run_id)
        return trainer.run()
    finally:
        if created_group:
            dist.destroy_process_group()


class _Trainer:
    """The state of one training process; `run()` is the loop."""

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        device: torch.device,
        stop_requested: Callable[[], int],
        mlflow_run_id: str,
    ) -> None:
        self.config, self.env, self.device = config, env, device
        self.stop_requested = stop_requested
        _seed_everything(config)
        self.run_dir = Path(config.run.dir)
        self.loader = TrainLoader(config.data, rank=env.rank, world_size=env.world_size, device=device)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total = total_steps(self.steps_per_epoch, config.optim)
        self.images_per_step = config.data.fr_batch + config.data.reg_batch

        self.model = build_model(config.model, quality_grad_to_backbone=config.loss.ig_grad_to_backbone).to(
            device
        )
        self.ddp_model: nn.Module = self.model
        if env.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        self.objective = IGFIQAObjective(
            self.loader.num_classes,
            config.model.embedding_size,
            config.loss,
            config.variance,
            seed=config.run.seed,
        ).to(device)
        # Two optimizers with the same schedule: the replicated backbone+head, and this rank's
        # classifier shard, whose momentum is saved unsharded so any world size can resume.
        optim = config.optim
        self.model_optimizer = torch.optim.SGD(
            self.model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
        self.classifier_optimizer = torch.optim.SGD(
            self.objective.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
        self.autocast = device.type == "cuda" and config.model.fp16
        self.control_group = None  # the default group is gloo already on CPU
        if env.world_size > 1 and device.type == "cuda":
            self.control_group = dist.new_group(backend="gloo")

        self.position = _Position()
        self.last_checkpoint = ""
        self.last_saved_step = -1
        resumed_run_id = self._resume()
        self.mlflow_run_id = resumed_run_id or mlflow_run_id
        self.monitor = TrainingMonitor(
            config,
            env,
            total_steps=self.total,
            run_id=self.mlflow_run_id,
            start_step=self.position.global_step,
        )
        self.mlflow_run_id = self.monitor.run_id

    # ------------------------------------------------------------------ resume / save

    def _resume(self) -> str:
        """Load `last.ckpt` if the run directory has one; returns the MLflow run id it names."""
        path = find_resume_checkpoint(self.run_dir)
        if path is None:
            return ""
        state = load_checkpoint(path, map_location="cpu")
        saved = config_from_dict(state["config"])
        if config_to_dict(saved)["model"] != config_to_dict(self.config)["model"]:
            raise CheckpointError(
                f"{path}: saved with model {config_to_dict(saved)['model']}, but the config asks for "
                f"{config_to_dict(self.config)['model']}; use another run.dir to start afresh"
            )
        self.model.load_state_dict(state["model"])
        self.model_optimizer.load_state_dict(state["optimizer"])
        self.objective.load_full_state(state, optimizer=self.classifier_optimizer)
        self.position = _Position(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))
        torch.set_rng_state(state["rng"]["torch"])
        if (
            self.device.type == "cuda"
            and state["rng"].get("cuda") is not None
            and state["rng"]["cuda"].numel()
        ):
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.last_checkpoint, self.last_saved_step = str(path), self.position.global_step
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

    def save(self, reason: str) -> None:
        """Collective: gather the sharded state to rank 0, which writes the checkpoint atomically."""
        sharded = self.objective.full_state(optimizer=self.classifier_optimizer, dst=0)
        if self.env.is_main:
            cuda_rng = (
                torch.cuda.get_rng_state()
                if self.device.type == "cuda"
                else torch.empty(0, dtype=torch.uint8)
            )
            state = {
                "format_version": FORMAT_VERSION,
                "config": config_to_dict(self.config),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "classifier": sharded["classifier"].cpu(),
                "variance": sharded["variance"].cpu(),
                "optimizer": self.model_optimizer.state_dict(),
                "scheduler": {
                    "kind": "multistep",
                    "base_lr": self.config.optim.lr,
                    "lr": self.current_lr(),
                    "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total,
                },
                "epoch": self.position.epoch,
                "step_in_epoch": self.position.step_in_epoch,
                "global_step": self.position.global_step,
                "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng},
                "mlflow_run_id": self.mlflow_run_id,
                "code_version": code_version(),
                "world_size": self.env.world_size,
                "reason": reason,
            }
            if "classifier_momentum" in sharded:
                state["classifier_momentum"] = sharded["classifier_momentum"].cpu()
            path = save_checkpoint(state, self.run_dir, keep=self.config.run.keep_checkpoints)
            self.last_checkpoint = str(path)
            log.info("checkpoint (%s) at step %d: %s", reason, self.position.global_step, path)
        self.last_saved_step = self.position.global_step
        if self.env.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ one step

    def current_lr(self) -> float:
        return self.config.optim.lr * lr_factor(
            self.position.global_step, self.steps_per_epoch, self.config.optim
        )

    def step(
        self,
        fr_images: torch.Tensor,
        fr_labels: torch.Tensor,
        reg_images: torch.Tensor,
        reg_labels: torch.Tensor,
    ) -> tuple[ObjectiveOutput, torch.Tensor]:
        """One optimizer step on this rank's halves (Fig. 2); returns the objective's outputs and the
        regression half's predicted quality."""
        lr = self.current_lr()
        for optimizer in (self.model_optimizer, self.classifier_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr
        progress = training_progress(self.position.global_step, self.total)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            # one DDP call; inside, the halves go through the backbone as model.forward says
            embeddings, quality = self.ddp_model(fr_images, reg_images)
        embeddings, quality = embeddings.float(), quality.float()
        n_fr = fr_images.shape[0]
        out = self.objective(
            embeddings[:n_fr], fr_labels, embeddings[n_fr:], quality[n_fr:], reg_labels, progress
        )
        self.model_optimizer.zero_grad(set_to_none=True)
        self.classifier_optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.model_optimizer.step()
        self.classifier_optimizer.step()
        return out, quality[n_fr:]

    def _decisions(self, since_save_s: float) -> tuple[int, bool]:
        """(stop code, time-based save due), the same on every rank (one tiny all-reduce)."""
        minutes = self.config.run.checkpoint_every_minutes
        due = bool(self.env.is_main and minutes > 0 and since_save_s >= minutes * 60.0)
        flags = torch.tensor([int(self.stop_requested()), int(due)], dtype=torch.int64)
        if self.env.world_size > 1:
            # a CPU (gloo) group: polling every step must not synchronise the GPU stream
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(flags[0]), bool(flags[1])

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        pos, cfg = self.position, self.config
        if pos.global_step >= self.total:
            log.info("nothing to do: the checkpoint is at step %d of %d", pos.global_step, self.total)
            self.monitor.finish(self, completed=True)
            return self._result(COMPLETED)
        self.ddp_model.train()
        self.objective.train()
        meter = StepMeter(self.device)
        last_save_time = time.monotonic()
        try:
            while pos.global_step < self.total:
                self.loader.set_epoch(pos.epoch, pos.step_in_epoch)
                batches = iter(self.loader)
                while pos.global_step < self.total:
                    wait_start = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:
                        break
                    meter.data_wait(time.perf_counter() - wait_start)
                    out, reg_quality = self.step(
                        batch.fr.images, batch.fr.labels, batch.reg.images, batch.reg.labels
                    )
                    pos.global_step += 1
                    pos.step_in_epoch = batch.step + 1
                    meter.add(out, reg_quality, self.images_per_step)
                    if pos.global_step % cfg.run.log_every == 0 or pos.global_step == self.total:
                        stats = class_weight_stats(self.objective)  # collective
                        self.monitor.log_step(
                            pos.global_step, pos.epoch, self.current_lr(), meter.collect(), stats
                        )
                    self.monitor.advance(pos.global_step)
                    stop, time_due = self._decisions(time.monotonic() - last_save_time)
                    if stop:
                        self.save("signal")
                        self.monitor.interrupted(pos.global_step)
                        return self._result(INTERRUPTED)
                    every = cfg.run.checkpoint_every_steps
                    if time_due or (every and pos.global_step % every == 0):
                        self.save("periodic")
                        last_save_time = time.monotonic()
                if pos.step_in_epoch >= self.steps_per_epoch:
                    self.monitor.epoch_end(pos.epoch, self.objective)
                    pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
            if self.last_saved_step != pos.global_step:
                self.save("final")
            self.monitor.finish(self, completed=True)
            return self._result(COMPLETED)
        except BaseException:
            self.monitor.failed()
            raise
        finally:
            self.loader.close()
            self.monitor.close()

    def _result(self, status: str) -> TrainResult:
        return TrainResult(
            status=status,
            global_step=self.position.global_step,
            epoch=self.position.epoch,
            checkpoint=self.last_checkpoint,
            mlflow_run_id=self.mlflow_run_id,
            metrics=dict(self.monitor.last_metrics),
        )
