"""The FIQA model: a backbone and the CR-FIQA quality head R = Linear(D, 1) on its embedding.

`model.head_input: embedding_and_norm` gives the head the embedding's norm too (Linear(D + 1, 1)
on [e, ||e|| / sqrt(D)]). The backbone ends in BatchNorm1d, so each embedding dimension is
centred over the data and no linear function of e is its norm, while the norm is a quality cue
(the larger, the more confidently the backbone recognises the face; MagFace builds on it). On the
demo's data, least-squares heads fit to one backbone's CR labels reach an EDC ratio of 0.66 on e
and 0.60 on [e, ||e||], against an oracle of 0.61 (docs/reproduction.md). The paper's head is the
default.

Batch separation (paper §3.2, Fig. 2: the degraded images are "excluded from the batch
forwarded to the FR backbone"). In training, `model(fr_images, reg_images)` forwards the two
halves in one of two ways (`model.forward`):

- ``separate`` (default): the FR (clean) half goes through the backbone alone, in train mode,
  and is the only input that updates BatchNorm's running statistics; the regression half goes
  through afterwards in a second forward. So the FR half's embeddings, L_Arc and its gradient,
  and the running statistics used at evaluation do not depend on the regression half's pixels.
- ``joint`` (ablation): one forward of the concatenated halves, as before the separation:
  BatchNorm's batch statistics (and the running ones) mix clean and degraded images.

How the regression half passes BatchNorm in ``separate`` mode (`model.reg_bn`):

- ``running`` (default): eval-mode BN, i.e. normalised by the running statistics of the clean
  images, exactly as the quality head sees images at inference; degraded images stay
  distinguishable from clean ones after normalisation.
- ``batch``: train-mode BN with the regression half's own batch statistics, without updating
  the running ones; normalising by the degraded batch's statistics partly undoes global
  degradations (darkening, contrast) during training but not at inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, load_model_state, state_dict_fingerprint
from pipeline.config import ModelConfig, TrainConfig, config_from_dict
from pipeline.method.backbones import build_backbone

ForwardMode = Literal["separate", "joint"]
RegressionBN = Literal["running", "batch"]
HeadInit = Literal["zeros", "uniform"]
HeadInput = Literal["embedding", "embedding_and_norm"]
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def regression_batch_norm(module: nn.Module, mode: RegressionBN) -> Iterator[None]:
    """BatchNorm layers of `module` as the regression half passes them (see the module docstring).

    ``running``: every BN layer in eval mode; ``batch``: train mode without tracking, so each layer
    normalises by the batch's statistics and leaves running_mean/var and num_batches_tracked alone.
    Restores every layer's flags on exit. Nothing changes when `module` is not training.
    """
    if mode not in ("running", "batch"):
        raise ValueError(f"unknown model.reg_bn {mode!r}: use 'running' or 'batch'")
    layers = [m for m in module.modules() if isinstance(m, _BATCH_NORMS)] if module.training else []
    saved = [(m.training, m.track_running_stats) for m in layers]
    try:
        for layer in layers:
            if mode == "running":
                layer.eval()
            else:
                layer.track_running_stats = False
        yield
    finally:
        for layer, (training, tracking) in zip(layers, saved):
            layer.train(training)
            layer.track_running_stats = tracking


class FIQAModel(nn.Module):
    """`forward(images) -> (embeddings [N, D], quality [N])`, quality = head(embedding).

    In training, `forward(fr_images, reg_images)` returns the same pair for the FR half followed
    by the regression half (`N = n_fr + n_reg`, FR rows first), forwarded as `forward_mode` says;
    one call, so DDP sees a single forward per step.

    `quality_grad_to_backbone=False` detaches the embedding before the head, so the
    regression loss trains only the head (`loss.ig_grad_to_backbone`); CR-FIQA lets
    it reach the backbone, which is the default.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embedding_size: int,
        *,
        quality_grad_to_backbone: bool = True,
        forward_mode: ForwardMode = "separate",
        reg_bn: RegressionBN = "running",
        head_init: HeadInit = "zeros",
        head_input: HeadInput = "embedding",
    ):
        super().__init__()
        if forward_mode not in ("separate", "joint"):
            raise ValueError(f"unknown model.forward {forward_mode!r}: use 'separate' or 'joint'")
        if reg_bn not in ("running", "batch"):
            raise ValueError(f"unknown model.reg_bn {reg_bn!r}: use 'running' or 'batch'")
        if head_input not in ("embedding", "embedding_and_norm"):
            raise ValueError(
                f"unknown model.head_input {head_input!r}: use 'embedding' or 'embedding_and_norm'"
            )
        self.backbone = backbone
        self.head_reads_norm = head_input == "embedding_and_norm"
        self.head = nn.Linear(embedding_size + int(self.head_reads_norm), 1)
        if head_init == "zeros":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif head_init != "uniform":
            raise ValueError(f"unknown model.head_init {head_init!r}: use 'zeros' or 'uniform'")
        self.embedding_size = embedding_size
        self.quality_grad_to_backbone = quality_grad_to_backbone
        self.forward_mode = forward_mode
        self.reg_bn = reg_bn

    def _quality(self, embeddings: torch.Tensor) -> torch.Tensor:
        head_input = embeddings if self.quality_grad_to_backbone else embeddings.detach()
        if self.head_reads_norm:
            # divided by sqrt(D): an input of order 1, like the centred dimensions beside it
            norm = head_input.norm(dim=1, keepdim=True) / self.embedding_size**0.5
            head_input = torch.cat([head_input, norm], dim=1)
        return self.head(head_input).squeeze(1)

    def forward(
        self, images: torch.Tensor, reg_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if reg_images is None:
            embeddings = self.backbone(images)
        elif self.forward_mode == "joint":
            embeddings = self.backbone(torch.cat([images, reg_images]))
        else:
            fr_embeddings = self.backbone(images)
            with regression_batch_norm(self.backbone, self.reg_bn):
                reg_embeddings = self.backbone(reg_images)
            embeddings = torch.cat([fr_embeddings, reg_embeddings])
        return embeddings, self._quality(embeddings)


def model_fingerprint(model: nn.Module) -> str:
    """A short content id of a model's weights: the first 16 hex of the SHA-256 over its state dict
    (names, dtypes, shapes and bytes, in name order). The same weights give the same id whichever
    checkpoint file (last.ckpt, step-N.ckpt, a copy) they were read from."""
    return state_dict_fingerprint(model.state_dict())


def build_model(model_cfg: ModelConfig, *, quality_grad_to_backbone: bool = True) -> FIQAModel:
    """FIQAModel from `ModelConfig` (pass `cfg.loss.ig_grad_to_backbone` when training)."""
    backbone = build_backbone(
        model_cfg.backbone, embedding_size=model_cfg.embedding_size, dropout=model_cfg.dropout
    )
    return FIQAModel(
        backbone,
        model_cfg.embedding_size,
        quality_grad_to_backbone=quality_grad_to_backbone,
        forward_mode=model_cfg.forward,
        reg_bn=model_cfg.reg_bn,
        head_init=model_cfg.head_init,
        head_input=model_cfg.head_input,
    )


def inference_model_from_state(
    state: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[FIQAModel, TrainConfig]:
    """(FIQAModel in eval mode on `device`, its TrainConfig) from a loaded training checkpoint or
    inference file (`pipeline.checkpoint.load_model_state`)."""
    try:
        config = config_from_dict(state["config"])
        model = build_model(config.model)
        model.load_state_dict(state["model"], strict=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"the checkpoint does not hold a model this code can build: {detail}") from None
    model.to(device).eval()
    return model, config


def load_inference_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[FIQAModel, TrainConfig]:
    """(FIQAModel in eval mode on `device`, its TrainConfig) from an inference file or a training
    checkpoint (read through its sibling inference file when there is one)."""
    state = load_model_state(path, map_location="cpu")
    try:
        return inference_model_from_state(state, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
