"""The FIQA model: a backbone and the CR-FIQA quality head R = Linear(D, 1) on its embedding."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.config import ModelConfig, TrainConfig, config_from_dict
from pipeline.method.backbones import build_backbone


class FIQAModel(nn.Module):
    """`forward(images) -> (embeddings [N, D], quality [N])`, quality = head(embedding).

    `quality_grad_to_backbone=False` detaches the embedding before the head, so the
    regression loss trains only the head (`loss.ig_grad_to_backbone`); CR-FIQA lets
    it reach the backbone, which is the default.
    """

    def __init__(self, backbone: nn.Module, embedding_size: int, *, quality_grad_to_backbone: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embedding_size, 1)
        self.embedding_size = embedding_size
        self.quality_grad_to_backbone = quality_grad_to_backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.backbone(images)
        head_input = embeddings if self.quality_grad_to_backbone else embeddings.detach()
        quality = self.head(head_input).squeeze(1)
        return embeddings, quality


def model_fingerprint(model: nn.Module) -> str:
    """A short content id of a model's weights: the first 16 hex of the SHA-256 over its state dict
    (names, dtypes, shapes and bytes, in name order). The same weights give the same id whichever
    checkpoint file (last.ckpt, step-N.ckpt, a copy) they were read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def build_model(model_cfg: ModelConfig, *, quality_grad_to_backbone: bool = True) -> FIQAModel:
    """FIQAModel from `ModelConfig` (pass `cfg.loss.ig_grad_to_backbone` when training)."""
    backbone = build_backbone(
        model_cfg.backbone, embedding_size=model_cfg.embedding_size, dropout=model_cfg.dropout
    )
    return FIQAModel(backbone, model_cfg.embedding_size, quality_grad_to_backbone=quality_grad_to_backbone)


def inference_model_from_state(
    state: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[FIQAModel, TrainConfig]:
    """(FIQAModel in eval mode on `device`, its TrainConfig) from a loaded training checkpoint."""
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
    """(FIQAModel in eval mode on `device`, its TrainConfig) from a training checkpoint file."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        return inference_model_from_state(state, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
