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


def z_score_weights(
    values: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor
) -> torch.Tensor:
    """ŵ = 1 + clamp((v − μ)/σ, −1, 0); all ones when σ = 0 (paper eq. 9). Device-side: no sync."""
    std = torch.as_tensor(std, dtype=values.dtype, device=values.device)
    mean = torch.as_tensor(mean, dtype=values.dtype, device=values.device)
    z = ((values - mean) / torch.where(std > 0, std, 1.0)).clamp(-1.0, 0.0)
    return torch.where(std > 0, 1.0 + z, torch.ones_like(values))


def _per_slot_sum(values: torch.Tensor, slot: torch.Tensor, slots: int) -> torch.Tensor:
    """Σ of `values` per slot index, [slots]: `index_put_(accumulate=True)`, which CUDA computes
    deterministically under `torch.use_deterministic_algorithms` (index_add_'s atomics are not)."""
    return torch.zeros(slots, dtype=values.dtype, device=values.device).index_put_(
        (slot,), values, accumulate=True
    )


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
        """Fold 1 − CCS of the GLOBAL batch (global order, same on every rank) into owned classes.

        Fixed-shape device ops over this rank's table (no `unique`, no `.item()`), so the step
        never waits for the device: samples of other ranks' classes go to a dummy slot.
        """
        if labels.shape != ccs.shape or labels.dim() != 1:
            raise ValueError(
                f"labels {tuple(labels.shape)} and ccs {tuple(ccs.shape)} must be equal 1-d shapes"
            )
        local = labels.long() - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        slot = torch.where(owned, local, self.num_local)  # num_local = the dummy slot
        observed = 1.0 - ccs.to(self.values.dtype)
        dtype, device = self.values.dtype, self.values.device
        all_counts = _per_slot_sum(torch.ones_like(slot), slot, self.num_local + 1)
        counts = all_counts[: self.num_local].to(dtype)
        if self.fold == "mean":
            means = _per_slot_sum(observed, slot, self.num_local + 1)[: self.num_local] / counts.clamp_min(
                1.0
            )
            updated = alpha * self.values + (1.0 - alpha) * means
            self.values.copy_(torch.where(counts > 0, updated, self.values))
            return
        # Sequential: the j-th of k samples of a class (in batch order) gets weight (1−α)·α^(k−1−j).
        order = torch.argsort(slot, stable=True)
        group_start = torch.cumsum(all_counts, 0) - all_counts
        position = torch.empty_like(slot)
        position[order] = torch.arange(slot.numel(), device=device) - group_start[slot[order]]
        alpha_t = torch.full((), alpha, dtype=dtype, device=device)
        steps_after = (all_counts[slot] - 1 - position).to(dtype)
        contributions = torch.where(owned, (1.0 - alpha) * alpha_t.pow(steps_after) * observed, 0.0)
        folded = _per_slot_sum(contributions, slot, self.num_local + 1)
        self.values.mul_(alpha_t.pow(counts)).add_(folded[: self.num_local])

    @torch.no_grad()
    def weights(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ŵ for each label of the GLOBAL batch, μ_v, σ_v as 0-d tensors); collective (one all-reduce)."""
        labels = labels.long()
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        shifted = self.values.double() - self.init_value
        # One all-reduce carries [count, Σ(v−v0), Σ(v−v0)²] and each label's v from its owner.
        own_values = self.values[local.clamp(0, self.num_local - 1)].double()
        # torch.full, not torch.tensor: a host scalar copied to a GPU would stall the step
        count = torch.full((1,), float(self.num_local), dtype=torch.float64, device=shifted.device)
        message = torch.cat(
            [count, shifted.sum()[None], (shifted * shifted).sum()[None], torch.where(owned, own_values, 0.0)]
        )
        all_reduce_(message, "sum", self.group)
        count = message[0]
        mean_shift = message[1] / count
        variance = (message[2] / count - mean_shift * mean_shift).clamp_min(0.0)
        mean, std = mean_shift + self.init_value, variance.sqrt()
        weights = z_score_weights(message[3:], mean, std)
        return weights.to(self.values.dtype), mean, std

    # ------------------------------------------------------------------ state

    def full_state(self, dst: int | None = 0) -> torch.Tensor | None:
        """The unsharded table [C] on rank `dst`'s CPU (all ranks' devices when None); collective."""
        return gather_class_rows(self.values, self.num_classes, self.group, dst)

    @torch.no_grad()
    def load_full_state(self, full: torch.Tensor) -> None:
        """Take this rank's slice of an unsharded table (saved on any world size)."""
        if full.shape != (self.num_classes,):
            raise ValueError(f"variance state has shape {tuple(full.shape)}, expected ({self.num_classes},)")
        self.values.copy_(slice_class_rows(full, self.num_classes, self.group))
