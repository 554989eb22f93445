"""The sharded per-class variance table of IG-FIQA (paper eqs. 7–9).

One float per class, sharded by class range like the classifier prototypes, a
buffer (no gradient), initialised to 1.0. Per step, for the samples of class y:

    v_y ← α·v_y + (1 − α)·(1 − CCS)                                 (eq. 8)
    ŵ_y = 1 + clamp((v_y − μ_v) / σ_v, −1, 0)                        (eq. 9)

with μ_v, σ_v the mean and (population) standard deviation over ALL classes,
from an all-reduce of count, sum and sum of squares (in float64, shifted by the
init value to avoid cancellation); σ_v = 0 (e.g. right after init) gives ŵ = 1.
This follows the paper's equations (EMA of 1 − CCS), not the authors' README
variant that keeps an EMA of CCS.

Decisions (config switches in `VarianceConfig`):

- `fold`: how several samples of one class in the same step enter the EMA.
  "sequential" (default) applies eq. 8 once per sample in global batch order:
  v ← α^k v + (1 − α) Σ_j α^(k−1−j) x_j. It is what eq. 8 says ("for every sample"),
  gives each sample the same influence whether or not its classmates share its
  batch, and depends only on the global batch order, hence not on the world size.
  "mean" takes one EMA step with the class's batch mean of 1 − CCS.
- α is passed in by the trainer each step (`pipeline.training.schedules.alpha_at`:
  linear 0.9 → 1.0 over training, or fixed for ablations).

`update` needs no communication: it takes the labels and CCS of the whole global
batch (identical on every rank, as the classifier gathers them) and each rank
updates the classes it owns.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import VarianceConfig
from pipeline.parallel.collectives import ProcessGroup, all_reduce_, rank, world_size
from pipeline.parallel.sharding import class_range, gather_class_rows, slice_class_rows


def z_score_weights(values: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """ŵ = 1 + clamp((v − μ)/σ, −1, 0); all ones when σ = 0 (paper eq. 9)."""
    if std <= 0.0:
        return torch.ones_like(values)
    return 1.0 + ((values - mean) / std).clamp(-1.0, 0.0)


class VarianceTable(nn.Module):
    """This rank's slice of the per-class EMA of 1 − CCS, and the z-score weights.

    `values` (a buffer) holds classes [class_start, class_start + num_local).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        init_value: float = 1.0,
        fold: str = "sequential",
        group: ProcessGroup = None,
    ) -> None:
        super().__init__()
        if fold not in ("sequential", "mean"):
            raise ValueError(f"unknown fold rule {fold!r} (variance.fold): use 'sequential' or 'mean'")
        self.num_classes = num_classes
        self.init_value = init_value
        self.fold = fold
        self.group = group
        self.class_start, self.num_local = class_range(num_classes, rank(group), world_size(group))
        self.register_buffer("values", torch.full((self.num_local,), float(init_value)))

    @classmethod
    def from_config(
        cls, num_classes: int, cfg: VarianceConfig, *, group: ProcessGroup = None
    ) -> VarianceTable:
        """Built from `VarianceConfig` (init value, fold rule)."""
        return cls(num_classes, init_value=cfg.init_value, fold=cfg.fold, group=group)

    @torch.no_grad()
    def update(self, labels: torch.Tensor, ccs: torch.Tensor, alpha: float) -> None:
        """Fold 1 − CCS of the GLOBAL batch (global order, same on every rank) into owned classes."""
        if labels.shape != ccs.shape or labels.dim() != 1:
            raise ValueError(
                f"labels {tuple(labels.shape)} and ccs {tuple(ccs.shape)} must be equal 1-d shapes"
            )
        local = labels.long() - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        if not bool(owned.any()):
            return
        local = local[owned]
        observed = 1.0 - ccs[owned].to(self.values.dtype)
        classes, group_of, counts = torch.unique(local, return_inverse=True, return_counts=True)
        current = self.values[classes]
        if self.fold == "mean":
            means = torch.zeros_like(current).index_add_(0, group_of, observed) / counts
            self.values[classes] = alpha * current + (1.0 - alpha) * means
            return
        # Sequential: the j-th of k samples (in batch order) gets weight (1−α)·α^(k−1−j).
        order = torch.argsort(group_of, stable=True)
        group_start = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(group_of)
        position[order] = (
            torch.arange(group_of.numel(), device=group_of.device) - group_start[group_of[order]]
        )
        alpha_t = torch.tensor(alpha, dtype=self.values.dtype, device=self.values.device)
        steps_after = (counts[group_of] - 1 - position).to(self.values.dtype)
        contributions = (1.0 - alpha) * alpha_t.pow(steps_after) * observed
        decayed = alpha_t.pow(counts.to(self.values.dtype)) * current
        self.values[classes] = decayed.index_add_(0, group_of, contributions)

    @torch.no_grad()
    def weights(self, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """(ŵ for each label of the GLOBAL batch, μ_v, σ_v); collective (one all-reduce)."""
        labels = labels.long()
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        shifted = self.values.double() - self.init_value
        # One all-reduce carries [count, Σ(v−v0), Σ(v−v0)²] and each label's v from its owner.
        message = torch.zeros(3 + labels.numel(), dtype=torch.float64, device=self.values.device)
        message[0] = self.num_local
        message[1] = shifted.sum()
        message[2] = (shifted * shifted).sum()
        message[3:][owned] = self.values[local[owned]].double()
        all_reduce_(message, "sum", self.group)
        count = message[0].item()
        mean_shift = message[1].item() / count
        variance = max(message[2].item() / count - mean_shift * mean_shift, 0.0)
        mean, std = mean_shift + self.init_value, variance**0.5
        weights = z_score_weights(message[3:], mean, std)
        return weights.to(self.values.dtype), mean, std

    # ------------------------------------------------------------------ state

    def full_state(self, dst: int | None = 0) -> torch.Tensor | None:
        """The unsharded table [C] on rank `dst` (all ranks when None); collective."""
        return gather_class_rows(self.values, self.num_classes, self.group, dst)

    @torch.no_grad()
    def load_full_state(self, full: torch.Tensor) -> None:
        """Take this rank's slice of an unsharded table (saved on any world size)."""
        if full.shape != (self.num_classes,):
            raise ValueError(f"variance state has shape {tuple(full.shape)}, expected ({self.num_classes},)")
        self.values.copy_(slice_class_rows(full, self.num_classes, self.group))
