"""One optimizer step of the paper's Fig. 2, on this rank's two halves; no data loading, no clock.

`TrainStep` owns the model (in DDP when there are several ranks), the objective with
its sharded classifier and variance table, and their two optimizers. The trainer
feeds it batches and the schedule's values; benchmarks feed it tensors directly, so
they time the loop's own step rather than a copy of it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainConfig
from pipeline.method.model import build_model
from pipeline.method.objective import IGFIQAObjective, ObjectiveOutput
from pipeline.training import perf
from pipeline.training.schedules import StepValues


class TrainStep:
    """Forward, objective, backward, clip and SGD for one step; collective on several ranks."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device, world_size: int) -> None:
        self.config, self.device = config, device
        self.model = build_model(config.model, quality_grad_to_backbone=config.loss.ig_grad_to_backbone).to(
            device
        )
        # the perf switches (pipeline/training/perf.py): the layout before DDP builds its buckets
        self.channels_last = perf.resolve_channels_last(config.perf.memory_format, device, self.model)
        perf.apply_channels_last(self.model, self.channels_last)
        # loss.mode fr: nothing trains the quality head, so it is frozen (DDP then waits for no
        # gradient of it) and only the FR half is forwarded (there is no regression half)
        self.face_recognition_only = config.loss.mode == "fr"
        if self.face_recognition_only:
            self.model.head.requires_grad_(False)
        # data.batch_mode single (CR-FIQA's training): one forward of the one batch, whose embeddings
        # and quality feed both the margin loss and the regression loss
        self.single_batch = config.data.batch_mode == "single"
        self.ddp_model: nn.Module = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        perf.compile_backbone(self.model, config.perf)
        self.objective = IGFIQAObjective(
            num_classes, config.model.embedding_size, config.loss, config.variance, seed=config.run.seed
        ).to(device)
        # Two optimizers with the same schedule: the replicated backbone+head, and this rank's
        # classifier shard, whose momentum is saved unsharded so any world size can resume.
        # The model's parameter groups: the backbone, then the quality head at lr x head_lr_factor.
        optim = config.optim
        head = list(self.model.head.parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        self.optimizer_choice = perf.resolve_optimizer_impl(config.perf.optimizer_impl, device)
        self.model_optimizer = perf.build_sgd(
            [{"params": backbone, "lr_factor": 1.0}, {"params": head, "lr_factor": optim.head_lr_factor}],
            optim,
            self.optimizer_choice,
        )
        self.classifier_optimizer = perf.build_sgd(
            list(self.objective.parameters()), optim, self.optimizer_choice
        )
        self.autocast = device.type == "cuda" and config.model.fp16

    def train(self) -> None:
        """Training mode for the model and the objective (the table updates only then)."""
        self.ddp_model.train()
        self.objective.train()

    def __call__(
        self,
        fr_images: torch.Tensor,
        fr_labels: torch.Tensor,
        reg_images: torch.Tensor,
        reg_labels: torch.Tensor,
        values: StepValues,
    ) -> tuple[ObjectiveOutput, torch.Tensor]:
        """One step at this step's LR and α; returns the objective's outputs and the regression
        half's predicted quality (`reg_images` is empty and unused in single-batch mode)."""
        for optimizer in (self.model_optimizer, self.classifier_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = values.lr * group.get("lr_factor", 1.0)
        # forward: backbone + quality head on both halves in one DDP call; inside, the halves go
        # through the backbone as model.forward says (separate: BN statistics from the FR half only)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.face_recognition_only or self.single_batch:
                embeddings, quality = self.ddp_model(fr_images)
            else:
                embeddings, quality = self.ddp_model(fr_images, reg_images)
        embeddings, quality = embeddings.float(), quality.float()
        n_fr = fr_images.shape[0]
        # objective: ArcFace on the FR half; CR, variance table, weights and L_IG on the regression
        # half, which is the FR half itself in single-batch mode
        reg_rows = slice(0, n_fr) if self.single_batch else slice(n_fr, None)
        if self.single_batch:
            reg_labels = fr_labels
        out = self.objective(
            embeddings[:n_fr],
            fr_labels,
            embeddings[reg_rows],
            quality[reg_rows],
            reg_labels,
            values.alpha,
            step=values.step,
        )
        # backward and update
        self.model_optimizer.zero_grad(set_to_none=True)
        self.classifier_optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.model_optimizer.step()
        self.classifier_optimizer.step()
        # Partial FC: the classifier's weight had no gradient (the optimizer skipped it); its
        # sampled rows and their momentum take the same SGD update here, the others none
        self.objective.classifier.step_sampled_rows(self.classifier_optimizer)
        return out, quality[reg_rows]
