"""The IG-FIQA training objective: the one module the training loop calls per step.

    out = objective(fr_embeddings, fr_labels, reg_embeddings, reg_quality, reg_labels, alpha)
    out.total.backward()

Inputs are this rank's LOCAL halves (every rank passes the same local sizes; the
global batch is rank 0's samples, then rank 1's, …). Per step:

1. ArcFace (or CosFace) loss on the FR half through the sharded classifier; its
   pre-margin target cosines are the FR half's CCS.
2. CCS, NNCCS of the regression half with no gradient; CR = CCS / (NNCCS + 1 + ε).
3. The variance table folds in 1 − CCS of one half (`variance.update_from`; default
   "fr", the clean images, as the paper's Fig. 2 suggests: CCS of degraded images
   measures the degradation, not the identity's spread), with the EMA momentum α the
   trainer passes in (its schedule), only in training mode. `variance.order` says whether this happens before (default, the
   paper's eq. order 8 → 9 → 10) or after the weights are read.
4. Weights ŵ of the regression samples' classes (mode "ig"), or all ones (mode "cr",
   CR-FIQA; the table is still maintained for monitoring).
5. L_IG = Σ ŵ·smoothL1(CR − q) over the global regression half (mean or sum,
   `loss.ig_reduction`); total = L_Arc + λ·L_IG.

Mode "fr" (face recognition only, the reference matchers) has no regression half: steps 2, 4
and 5 are skipped, L_IG is 0 and total is L_Arc itself; the table still follows the FR half's
CCS (step 3), for monitoring.

Gradient convention (the training loop wraps backbone + quality head in DDP, which
AVERAGES gradients over W ranks, and keeps the classifier out of DDP): every loss
VALUE returned is the global one, identical on all ranks and equal to the
one-process value; the backward of `total` gives each rank W × its share of the
global gradient for DDP-averaged parameters (so DDP's mean is the one-process
gradient) and the exact gradient for its own classifier shard. Whether L_IG
reaches the backbone is decided where the quality is computed
(`FIQAModel(quality_grad_to_backbone=loss.ig_grad_to_backbone)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import LossConfig, VarianceConfig
from pipeline.method.losses import certainty_ratio, weighted_regression_loss
from pipeline.method.margin_classifier import MarginOutput, ParallelMarginClassifier
from pipeline.method.variance_table import VarianceTable
from pipeline.parallel.collectives import ProcessGroup, all_reduce_, rank, scale_grad, world_size


@dataclass
class ObjectiveOutput:
    """One step's losses (global values) and this rank's per-sample quantities, for logging."""

    loss_arc: torch.Tensor  # scalar, differentiable
    loss_ig: torch.Tensor  # scalar, differentiable (already excludes λ)
    total: torch.Tensor  # loss_arc + λ·loss_ig: call backward on this
    cr: torch.Tensor  # [n_reg_local] CR pseudo-labels
    ccs: torch.Tensor  # [n_reg_local]
    nnccs: torch.Tensor  # [n_reg_local]
    weights: torch.Tensor  # [n_reg_local] ŵ used in L_IG (ones in mode "cr")
    fr_ccs: torch.Tensor  # [n_fr_local] CCS of the clean half (monitoring)


class IGFIQAObjective(nn.Module):
    """ArcFace + CR/IG regression with the sharded classifier and variance table."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        loss_cfg: LossConfig,
        variance_cfg: VarianceConfig,
        *,
        group: ProcessGroup = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss_cfg.mode not in ("ig", "cr", "fr"):
            raise ValueError(f"unknown loss.mode {loss_cfg.mode!r}: use 'ig', 'cr' or 'fr'")
        if variance_cfg.update_from not in ("fr", "reg"):
            raise ValueError(f"unknown variance.update_from {variance_cfg.update_from!r}: use 'fr' or 'reg'")
        if loss_cfg.mode == "fr" and variance_cfg.update_from != "fr":
            raise ValueError("loss.mode 'fr' has no regression half: variance.update_from must be 'fr'")
        self.loss_cfg = loss_cfg
        self.variance_cfg = variance_cfg
        self.group = group
        self.classifier = ParallelMarginClassifier.from_config(
            num_classes, embedding_size, loss_cfg, group=group, seed=seed
        )
        self.variance = VarianceTable.from_config(num_classes, variance_cfg, group=group)

    def forward(
        self,
        fr_embeddings: torch.Tensor,
        fr_labels: torch.Tensor,
        reg_embeddings: torch.Tensor,
        reg_quality: torch.Tensor,
        reg_labels: torch.Tensor,
        alpha: float,
        *,
        step: int = 0,
    ) -> ObjectiveOutput:
        """One step on this rank's local halves with EMA momentum `alpha`; collective.

        `step` (the global step) seeds Partial FC's sample of classes (`loss.partial_fc`).
        """
        if reg_quality.shape != reg_labels.shape or reg_embeddings.shape[0] != reg_labels.shape[0]:
            raise ValueError(
                f"regression half: {tuple(reg_embeddings.shape)} embeddings, {tuple(reg_quality.shape)} "
                f"quality predictions and {tuple(reg_labels.shape)} labels do not match"
            )
        size, me = world_size(self.group), rank(self.group)

        # DDP averages over W ranks; scaling the embedding gradient by W makes that average exact.
        margin = self.classifier(scale_grad(fr_embeddings, size), fr_labels, step=step)
        if self.loss_cfg.mode == "fr":
            return self._face_recognition_only(margin, fr_labels, reg_labels, alpha, me)
        stats = self.classifier.similarity_stats(reg_embeddings, reg_labels)
        cr = certainty_ratio(stats.ccs, stats.nnccs, self.loss_cfg.cr_eps)

        if self.variance_cfg.update_from == "fr":
            update_labels, update_ccs = margin.labels, margin.ccs
        else:
            update_labels, update_ccs = stats.labels, stats.ccs
        update_first = self.variance_cfg.order == "update_then_weigh"
        if self.training and update_first:
            self.variance.update(update_labels, update_ccs, alpha)
        weights, _, _ = self.variance.weights(stats.labels)
        if self.training and not update_first:
            self.variance.update(update_labels, update_ccs, alpha)
        if self.loss_cfg.mode == "cr":
            weights = torch.ones_like(weights)

        n_local = reg_labels.shape[0]
        mine = slice(me * n_local, (me + 1) * n_local)
        loss_ig = self._global_regression_loss(reg_quality, cr[mine], weights[mine], n_local * size, size)
        total = margin.loss + self.loss_cfg.lambda_ig * loss_ig

        n_fr = fr_labels.shape[0]
        return ObjectiveOutput(
            loss_arc=margin.loss,
            loss_ig=loss_ig,
            total=total,
            cr=cr[mine],
            ccs=stats.ccs[mine],
            nnccs=stats.nnccs[mine],
            weights=weights[mine],
            fr_ccs=margin.ccs[me * n_fr : (me + 1) * n_fr],
        )

    def _face_recognition_only(
        self, margin: MarginOutput, fr_labels: torch.Tensor, reg_labels: torch.Tensor, alpha: float, me: int
    ) -> ObjectiveOutput:
        """Mode "fr": the margin loss alone; the table follows the FR half's CCS (monitoring only)."""
        if reg_labels.numel():
            raise ValueError(
                f"loss.mode 'fr' trains without a regression half, got {reg_labels.numel()} regression samples"
            )
        if self.training:
            self.variance.update(margin.labels, margin.ccs, alpha)
        n_fr = fr_labels.shape[0]
        empty = margin.ccs.new_zeros(0)
        return ObjectiveOutput(
            loss_arc=margin.loss,
            loss_ig=margin.loss.new_zeros(()),
            total=margin.loss,
            cr=empty,
            ccs=empty,
            nnccs=empty,
            weights=empty,
            fr_ccs=margin.ccs[me * n_fr : (me + 1) * n_fr],
        )

    def _global_regression_loss(
        self, quality: torch.Tensor, cr: torch.Tensor, weights: torch.Tensor, global_count: int, size: int
    ) -> torch.Tensor:
        """The global L_IG value, whose backward gives this rank W × its share of the gradient."""
        cfg = self.loss_cfg
        local = weighted_regression_loss(
            quality, cr, weights, cfg.smooth_l1_beta, cfg.ig_reduction, count=global_count
        )
        if size == 1:
            return local
        global_value = all_reduce_(local.detach().clone(), "sum", self.group)
        scaled = local * size
        return scaled + (global_value - scaled.detach())

    # ------------------------------------------------------------------ state

    def full_state(
        self, optimizer: torch.optim.Optimizer | None = None, dst: int | None = 0
    ) -> dict[str, torch.Tensor]:
        """Checkpoint entries "classifier", "classifier_momentum" (if any), "variance", unsharded, on `dst`'s CPU.

        Collective; other ranks get {}. `optimizer` is the one that steps the classifier.
        """
        out = self.classifier.full_state(optimizer, dst)
        variance = self.variance.full_state(dst)
        if variance is not None:
            out["variance"] = variance
        return out

    def load_full_state(
        self, state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Restore from unsharded entries saved on any world size (re-sharded by class range)."""
        self.classifier.load_full_state(state, optimizer)
        self.variance.load_full_state(state["variance"])
