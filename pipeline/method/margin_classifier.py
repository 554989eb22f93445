"""Model-parallel margin classifier: class-sharded prototypes, ArcFace/CosFace, distributed softmax.

Rank r owns prototypes W[start:start+count] (`pipeline.parallel.sharding.class_range`).
Every rank all-gathers the embeddings (with autograd) and labels of the whole global
batch in rank order, computes cosines against its own prototypes only, and the
softmax cross-entropy is assembled across shards by an all-reduce of the row
maximum and then of the exp-sum (`DistributedSoftmaxCrossEntropy`), as InsightFace's
model-parallel PartialFC does (sample rate 1). With no process group it is the
ordinary dense ArcFace head.

Gradient convention: the loss returned is the mean over the GLOBAL batch and is the
same number on every rank. Each rank's backward gives its prototype shard the exact
gradient of that loss (no averaging needed or wanted: keep the classifier out of DDP),
and gives its LOCAL embeddings the exact d(loss)/d(embedding) (the all-gather's
backward sums the contributions of every class shard). DDP then divides backbone
gradients by W; `pipeline.method.objective.IGFIQAObjective` compensates with
`scale_grad(·, W)` on the embeddings, so the averaged gradient equals the
one-process gradient.

`similarity_stats` gives, with no gradient, CCS (cosine to the own prototype, found
on the owner rank, all-reduce SUM) and NNCCS (the largest cosine to any other class:
local max with the positive masked to −inf, all-reduce MAX). NNCCS is the true
maximum of paper eq. (1), so it is negative when every negative cosine is; the
CR-FIQA code masks the positive with −1e-12 instead, which floors NNCCS at ~0.

Partial FC (`sample_rate` < 1, `pipeline.method.partial_fc`): the forward uses this step's
sample of the shard's rows (a leaf tensor of its own, so the weight parameter gets no
gradient); after backward, `step_sampled_rows(optimizer)` updates those rows and their
momentum only. CCS is then taken row by row from the own prototype, and NNCCS over every
row of the shard (`nnccs="exact"`) or over the step's sample (`"sampled"`). With
`sample_rate` 1 none of this runs: the code path is the full classifier's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LossConfig
from pipeline.method.partial_fc import (
    draw_rows,
    max_other_cosine,
    positions_in,
    sample_count,
    sampled_sgd_step,
    step_seed,
)
from pipeline.parallel.collectives import (
    ProcessGroup,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_,
    rank,
    world_size,
)
from pipeline.parallel.sharding import class_range, gather_class_rows, slice_class_rows

_INIT_BLOCK = 4096  # prototypes are drawn in blocks of classes, each from its own seed


@dataclass
class MarginOutput:
    """ArcFace loss of the global batch plus what the variance table needs."""

    loss: torch.Tensor  # scalar: mean softmax cross-entropy over the global batch (same on all ranks)
    ccs: torch.Tensor  # [B_global], no grad: cosine to the own prototype, before the margin
    labels: torch.Tensor  # [B_global]: the gathered labels, in global batch order


@dataclass
class SimilarityStats:
    """CCS / NNCCS of every sample of the global batch (rank order), no grad."""

    ccs: torch.Tensor  # [B_global]
    nnccs: torch.Tensor  # [B_global]
    labels: torch.Tensor  # [B_global]


class DistributedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split by class over ranks: [B, C_local] per rank.

    `local_target` holds the class index within this rank's shard, or −1 where
    another rank owns the sample's class. Forward: all-reduce MAX of row maxima, SUM
    of exp-sums and SUM of the (shifted) target logit; loss_i = log Σ exp − target.
    Backward needs no communication: d loss / d logits = (softmax − one-hot) / B.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local_target: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        owned, index = _own_columns(local_target)
        row_max = all_reduce_(logits.detach().amax(dim=1), "max", group)
        shifted = logits.detach() - row_max[:, None]
        exp = shifted.exp()
        exp_sum = all_reduce_(exp.sum(dim=1), "sum", group)
        target = torch.where(owned, shifted.gather(1, index).squeeze(1), 0.0)
        all_reduce_(target, "sum", group)
        probs = exp.div_(exp_sum[:, None])
        ctx.save_for_backward(probs, owned, index)
        return (exp_sum.log() - target).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        probs, owned, index = ctx.saved_tensors
        # − one-hot where owned; gather/scatter without accumulation stay deterministic on CUDA
        target = probs.gather(1, index) - owned.to(probs.dtype)[:, None]
        grad = probs.scatter(1, index, target)
        return grad.mul_(grad_loss / probs.shape[0]), None, None


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels outside [0, num_classes) without stalling a GPU step.

    On a GPU the verdict stays on the device (`torch._assert_async` fails the stream later):
    reading it on the host would stall every step. The loader has checked every manifest
    label on the host already; this catches direct callers.
    """
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    if labels.is_cuda:
        torch._assert_async(in_range, f"labels must lie in [0, {num_classes})")
    elif labels.numel() and not in_range:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}"
        )


def _own_columns(local_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row owned by this shard [B] bool, its target column [B, 1], 0 where not owned).

    Fixed shapes and masks instead of `nonzero` row lists: nothing in the step waits for
    the device to say how many rows this rank owns.
    """
    owned = local_target >= 0
    return owned, local_target.clamp_min(0)[:, None]


class ParallelMarginClassifier(nn.Module):
    """Class-sharded prototypes with an ArcFace (or CosFace) margin softmax.

    `forward(local_embeddings, local_labels) -> MarginOutput` (collective: every rank
    calls it with the same local batch size). `similarity_stats(...)` gives CCS and
    NNCCS without gradient. `full_state` / `load_full_state` move the prototypes and
    their SGD momentum in and out as unsharded [C, D] tensors by global class id. With
    `sample_rate` < 1 (Partial FC) call `step_sampled_rows(optimizer)` after the optimizer's
    own step: it updates the rows the forward used.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        margin: Literal["arcface", "cosface"] = "arcface",
        scale: float = 64.0,
        arc_margin: float = 0.5,
        cos_margin: float = 0.35,
        group: ProcessGroup = None,
        init_std: float = 0.01,
        seed: int = 0,
        sample_rate: float = 1.0,
        nnccs: Literal["exact", "sampled"] = "exact",
    ) -> None:
        super().__init__()
        size = world_size(group)
        if num_classes < max(2, size):
            raise ValueError(
                f"the classifier needs at least max(2, world size {size}) classes, got {num_classes}"
            )
        if margin not in ("arcface", "cosface"):
            raise ValueError(f"unknown margin {margin!r} (loss.margin): use 'arcface' or 'cosface'")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"loss.partial_fc.sample_rate: {sample_rate} must lie in (0, 1]")
        if nnccs not in ("exact", "sampled"):
            raise ValueError(f"unknown loss.partial_fc.nnccs {nnccs!r}: use 'exact' or 'sampled'")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = margin
        self.scale = scale
        self.arc_margin = arc_margin
        self.cos_margin = cos_margin
        self.group = group
        self.seed = seed
        self.sample_rate = sample_rate
        self.nnccs = nnccs
        self.sampling = sample_rate < 1.0
        # this step's sample (shard row ids) and its prototypes as a leaf tensor (Partial FC only)
        self.sampled_rows: torch.Tensor | None = None
        self._sampled_weight: torch.Tensor | None = None
        self.class_start, self.num_local = class_range(num_classes, rank(group), size)
        self.weight = nn.Parameter(
            _init_rows(self.class_start, self.num_local, embedding_size, init_std, seed)
        )

    @classmethod
    def from_config(
        cls,
        num_classes: int,
        embedding_size: int,
        loss_cfg: LossConfig,
        *,
        group: ProcessGroup = None,
        seed: int = 0,
    ) -> ParallelMarginClassifier:
        """Built from `LossConfig` (margin kind, scale s, ArcFace m, CosFace m, Partial FC)."""
        return cls(
            num_classes,
            embedding_size,
            margin=loss_cfg.margin,
            scale=loss_cfg.scale,
            arc_margin=loss_cfg.arc_margin,
            cos_margin=loss_cfg.cos_margin,
            group=group,
            seed=seed,
            sample_rate=loss_cfg.partial_fc.sample_rate,
            nnccs=loss_cfg.partial_fc.nnccs,
        )

    # ------------------------------------------------------------------ forward

    def _local_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Index of each label inside this shard, −1 where another rank owns it."""
        _check_labels(labels, self.num_classes)
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        return torch.where(owned, local, torch.full_like(local, -1))

    def _cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(embeddings.dtype)
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1)).clamp(-1.0, 1.0)

    def _with_margin(self, target_cos: torch.Tensor) -> torch.Tensor:
        """The margin-adjusted target cosine (before the scale)."""
        if self.margin == "cosface":
            return target_cos - self.cos_margin
        m = self.arc_margin
        # Clamped so that cos = ±1 gives a zero (not infinite) gradient through the sine.
        sin = (1.0 - target_cos * target_cos).clamp_min(1e-12).sqrt()
        cos_theta_plus_m = target_cos * math.cos(m) - sin * math.sin(m)
        # Past θ = π − m, cos(θ + m) would rise again: use the linear fallback of arcface_torch.
        return torch.where(
            target_cos > math.cos(math.pi - m), cos_theta_plus_m, target_cos - math.sin(math.pi - m) * m
        )

    def forward(
        self,
        local_embeddings: torch.Tensor,
        local_labels: torch.Tensor,
        *,
        step: int = 0,
        rows: torch.Tensor | None = None,
    ) -> MarginOutput:
        """Margin-softmax loss of the global batch; collective.

        Partial FC: `step` seeds this step's sample; `rows` (sorted shard row ids holding every
        owned positive) replaces the draw.
        """
        if rows is not None and not self.sampling:
            raise ValueError("rows are a Partial FC sample: they need sample_rate < 1")
        embeddings = all_gather_with_grad(local_embeddings, self.group)
        labels = all_gather_no_grad(local_labels.long(), self.group)
        local_target = self._local_targets(labels)
        if self.sampling:
            if rows is None:
                count = sample_count(self.num_local, self.sample_rate, labels.shape[0])
                seed = step_seed(self.seed, step, rank(self.group))
                rows = draw_rows(local_target, self.num_local, count, seed)
            self.sampled_rows = rows
            self._sampled_weight = self.weight.detach().index_select(0, rows).requires_grad_()
            weight = self._sampled_weight.to(embeddings.dtype)
            cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1)).clamp(-1.0, 1.0)
            return self._margin_loss(cos, positions_in(rows, local_target), labels)
        return self._margin_loss(self._cosines(embeddings), local_target, labels)

    def _margin_loss(
        self, cos: torch.Tensor, local_target: torch.Tensor, labels: torch.Tensor
    ) -> MarginOutput:
        """The margin softmax over these columns; `local_target` is each sample's column or −1."""
        owned, index = _own_columns(local_target)
        target_cos = cos.gather(1, index).squeeze(1)
        # rows of other shards write their own cosine back, unchanged
        with_margin = torch.where(owned, self._with_margin(target_cos), target_cos)
        logits = cos.scatter(1, index, with_margin[:, None]) * self.scale
        loss = DistributedSoftmaxCrossEntropy.apply(logits, local_target, self.group)
        ccs = all_reduce_(torch.where(owned, target_cos.detach(), 0.0), "sum", self.group)
        return MarginOutput(loss=loss, ccs=ccs, labels=labels)

    @torch.no_grad()
    def similarity_stats(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> SimilarityStats:
        """CCS and NNCCS (paper eq. 1) of the global batch, no gradient; collective."""
        embeddings = all_gather_no_grad(local_embeddings.detach(), self.group)
        labels = all_gather_no_grad(local_labels.long(), self.group)
        if self.sampling:
            return self._sampled_similarity_stats(embeddings, labels)
        owned, index = _own_columns(self._local_targets(labels))
        cos = self._cosines(embeddings)
        target_cos = cos.gather(1, index).squeeze(1)
        ccs = all_reduce_(torch.where(owned, target_cos, 0.0), "sum", self.group)
        # mask the positive with −inf: NNCCS is the best OTHER class
        cos.scatter_(1, index, torch.where(owned, -math.inf, target_cos)[:, None])
        nnccs = all_reduce_(cos.amax(dim=1), "max", self.group)
        return SimilarityStats(ccs=ccs, nnccs=nnccs, labels=labels)

    def _sampled_similarity_stats(self, embeddings: torch.Tensor, labels: torch.Tensor) -> SimilarityStats:
        """Partial FC: CCS from each sample's own prototype; NNCCS over the shard or the step's sample."""
        local_target = self._local_targets(labels)
        owned, index = _own_columns(local_target)
        unit = F.normalize(embeddings, dim=1)
        own = F.normalize(self.weight.detach().index_select(0, index.squeeze(1)).to(unit.dtype), dim=1)
        target_cos = (unit * own).sum(dim=1).clamp(-1.0, 1.0)
        ccs = all_reduce_(torch.where(owned, target_cos, 0.0), "sum", self.group)
        if self.nnccs == "exact":
            local_max = max_other_cosine(unit, self.weight.detach(), local_target, None)
        else:
            if self.sampled_rows is None:
                raise RuntimeError("loss.partial_fc.nnccs 'sampled' needs this step's forward first")
            weight = self.weight.detach().index_select(0, self.sampled_rows)
            local_max = max_other_cosine(unit, weight, local_target, self.sampled_rows)
        nnccs = all_reduce_(local_max, "max", self.group)
        return SimilarityStats(ccs=ccs, nnccs=nnccs, labels=labels)

    @torch.no_grad()
    def step_sampled_rows(self, optimizer: torch.optim.Optimizer) -> None:
        """Partial FC: SGD on the rows the last forward used, from their gradient (after backward).

        Nothing happens without a sample or its gradient (sample_rate 1: the optimizer's own
        step updated the whole shard). The sample is consumed: a second call does nothing.
        """
        sampled, rows = self._sampled_weight, self.sampled_rows
        self._sampled_weight = None
        if sampled is None or rows is None or sampled.grad is None:
            return
        sampled_sgd_step(optimizer, self.weight, rows, sampled.grad)

    @property
    def sampled_grad(self) -> torch.Tensor | None:
        """The gradient of the last forward's sampled prototypes [rows, D] (Partial FC), if any."""
        return None if self._sampled_weight is None else self._sampled_weight.grad

    # ------------------------------------------------------------------ state

    def full_state(
        self, optimizer: torch.optim.Optimizer | None = None, dst: int | None = 0
    ) -> dict[str, torch.Tensor]:
        """{"classifier": [C, D], "classifier_momentum": [C, D] if the optimizer has one} on `dst`'s CPU.

        Collective (call on every rank); other ranks get {}. The shards are streamed one rank at
        a time (`gather_class_rows`). `dst=None` gives it to all, on their devices.
        """
        out: dict[str, torch.Tensor] = {}
        weight = gather_class_rows(self.weight.detach(), self.num_classes, self.group, dst)
        if weight is not None:
            out["classifier"] = weight
        momentum = _momentum_buffer(optimizer, self.weight)
        if momentum is not None:
            full = gather_class_rows(momentum, self.num_classes, self.group, dst)
            if full is not None:
                out["classifier_momentum"] = full
        return out

    @torch.no_grad()
    def load_full_state(
        self, state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Take this rank's rows of an unsharded state (saved on any world size)."""
        full = state["classifier"]
        if full.shape != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"classifier state has shape {tuple(full.shape)}, expected ({self.num_classes}, {self.embedding_size})"
            )
        self.weight.copy_(slice_class_rows(full, self.num_classes, self.group))
        if optimizer is not None and "classifier_momentum" in state:
            rows = slice_class_rows(state["classifier_momentum"], self.num_classes, self.group)
            optimizer.state[self.weight]["momentum_buffer"] = rows.to(self.weight.device, self.weight.dtype)


def _momentum_buffer(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> torch.Tensor | None:
    if optimizer is None:
        return None
    return optimizer.state.get(param, {}).get("momentum_buffer")


def _init_rows(start: int, count: int, embedding_size: int, std: float, seed: int) -> torch.Tensor:
    """Rows [start, start+count) of a N(0, std) prototype matrix that does not depend on the world size.

    Hand-written because torch has no counter-based RNG: each block of `_INIT_BLOCK`
    classes is drawn from its own seeded generator, so any shard can be built alone.
    """
    rows = torch.empty(count, embedding_size)
    first_block, last_block = start // _INIT_BLOCK, (start + count - 1) // _INIT_BLOCK
    for block in range(first_block, last_block + 1 if count else first_block):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(_INIT_BLOCK, embedding_size, generator=generator) * std
        lo = max(start, block * _INIT_BLOCK)
        hi = min(start + count, (block + 1) * _INIT_BLOCK)
        rows[lo - start : hi - start] = values[lo - block * _INIT_BLOCK : hi - block * _INIT_BLOCK]
    return rows
