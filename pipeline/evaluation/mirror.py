"""Test-time flip (InsightFace's `test`): an image batch and its mirror images through one model.

An image's embedding is the sum of its own and its mirror image's (normalised later, where it is
compared); its quality is the mean of the two (a face and its mirror image are equally
recognisable, so averaging takes out some of the quality head's noise). The one implementation,
for our model on the device (`scoring.infer_batch`, torch tensors) and for an ONNX FR model
(`evaluate.embed_set`, numpy arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

Batch = TypeVar("Batch", np.ndarray, torch.Tensor)


def mirror(images: Batch) -> Batch:
    """The mirror images of a batch [N, C, H, W]: the width axis reversed (a contiguous copy)."""
    if isinstance(images, torch.Tensor):
        return torch.flip(images, dims=[-1])
    return np.ascontiguousarray(images[..., ::-1])


def with_mirror(
    forward: Callable[[Batch], tuple[Batch, Batch | None]], images: Batch, *, flip: bool
) -> tuple[Batch, Batch | None]:
    """(embeddings, quality or None) of `forward(images)`; with `flip`, combined with the mirror images'."""
    embeddings, quality = forward(images)
    if not flip:
        return embeddings, quality
    mirror_embeddings, mirror_quality = forward(mirror(images))
    embeddings = embeddings + mirror_embeddings
    if quality is not None:
        quality = (quality + mirror_quality) / 2
    return embeddings, quality
