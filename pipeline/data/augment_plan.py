"""Per-sample augmentation decisions and parameters, drawn in numpy before DALI sees the images.

The DALI graph has no random operators: every choice (flip, which degradations,
their sizes and factors) is drawn here from a generator seeded by
(seed, epoch, step) for the whole global step and handed to DALI as per-sample
arguments. So the same seed gives the same augmentations on any number of ranks,
and resuming at a step needs no DALI state.

Every value is drawn for every sample whatever the probabilities, so changing
`p_erase` changes which samples are erased but not the flips or rescale sizes.

Degradations (paper §3.2, §4.1), each independently with its probability:
- rescale: shrink to a square of side round(f · size), f ~ U[rescale_min, rescale_max],
  then back to size × size (a blur);
- erase: a rectangle of area fraction a ~ U[erase_area_min, erase_area_max] and aspect
  h/w log-uniform in [erase_aspect_min, erase_aspect_max] (as in Zhong et al.'s random
  erasing), clipped to the image, at a uniform position, set to pixel value `erase_fill`;
- color: brightness, contrast, saturation factors each ~ U[1 − x, 1 + x].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline.config import AugmentConfig, BatchLayout
from pipeline.data.sampler import AUGMENT_STREAM, stream_rng

DEGRADATIONS = ("rescale", "erase", "color")  # column order of `flags`


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation of a batch, one row per sample."""

    flip: np.ndarray  # bool [n]: mirror horizontally
    flags: np.ndarray  # bool [n, 3]: rescale, erase, color applied
    rescale_size: np.ndarray  # float32 [n, 2]: (h, w) of the shrunken image, pixels
    erase_anchor: np.ndarray  # float32 [n, 2]: (y, x) of the erased rectangle's top-left corner
    erase_shape: np.ndarray  # float32 [n, 2]: (h, w) of the erased rectangle
    color: np.ndarray  # float32 [n, 3]: brightness, contrast, saturation factors

    def __len__(self) -> int:
        return len(self.flip)

    def take(self, positions: np.ndarray | slice) -> AugmentParams:
        """The rows at `positions`."""
        return AugmentParams(
            flip=self.flip[positions],
            flags=self.flags[positions],
            rescale_size=self.rescale_size[positions],
            erase_anchor=self.erase_anchor[positions],
            erase_shape=self.erase_shape[positions],
            color=self.color[positions],
        )

    def describe(self, i: int) -> str:
        """A short caption of what sample `i` receives, e.g. 'flip · rescale 38px · erase 20×31'."""
        parts = ["flip"] if self.flip[i] else []
        if self.flags[i, 0]:
            parts.append(f"rescale {int(self.rescale_size[i, 0])}px")
        if self.flags[i, 1]:
            parts.append(f"erase {int(self.erase_shape[i, 0])}×{int(self.erase_shape[i, 1])}")
        if self.flags[i, 2]:
            b, c, s = self.color[i]
            parts.append(f"color b{b:.2f} c{c:.2f} s{s:.2f}")
        degraded = bool(self.flags[i].any())
        return " · ".join(parts if degraded else [*parts, "clean"])


def draw_params(
    cfg: AugmentConfig, image_size: int, count: int, rng: np.random.Generator, *, degrade: bool = True
) -> AugmentParams:
    """Draw the augmentation of `count` samples; `degrade=False` keeps only the flip (the FR half)."""
    size = int(image_size)
    flip_u = rng.random(count)
    flag_u = rng.random((count, 3))
    rescale_f = rng.uniform(cfg.rescale_min, cfg.rescale_max, count)
    area = rng.uniform(cfg.erase_area_min, cfg.erase_area_max, count) * size * size
    log_aspect = rng.uniform(np.log(cfg.erase_aspect_min), np.log(cfg.erase_aspect_max), count)
    anchor_u = rng.random((count, 2))
    factors = (
        rng.uniform(-1.0, 1.0, (count, 3)) * np.array([cfg.brightness, cfg.contrast, cfg.saturation]) + 1.0
    )

    side = np.clip(np.rint(rescale_f * size), 1, size - 1)
    aspect = np.exp(log_aspect)
    erase_h = np.clip(np.rint(np.sqrt(area * aspect)), 1, size)
    erase_w = np.clip(np.rint(np.sqrt(area / aspect)), 1, size)
    erase_shape = np.stack([erase_h, erase_w], axis=1)
    erase_anchor = np.floor(anchor_u * (size - erase_shape + 1))

    probabilities = np.array([cfg.p_rescale, cfg.p_erase, cfg.p_color])
    flags = (flag_u < probabilities) if degrade else np.zeros((count, 3), dtype=bool)
    flip = (flip_u < 0.5) if cfg.flip else np.zeros(count, dtype=bool)
    return AugmentParams(
        flip=flip,
        flags=flags,
        rescale_size=np.stack([side, side], axis=1).astype(np.float32),
        erase_anchor=erase_anchor.astype(np.float32),
        erase_shape=erase_shape.astype(np.float32),
        color=factors.astype(np.float32),
    )


def step_params(
    cfg: AugmentConfig,
    image_size: int,
    *,
    seed: int,
    epoch: int,
    step: int,
    layout: BatchLayout,
    degrade_fr: bool = False,
) -> AugmentParams:
    """The augmentation of a whole global step: `layout.fr_batch` FR rows (flip only, or degraded
    like the regression rows with `degrade_fr`: data.batch_mode single), then `layout.reg_batch`
    regression rows."""
    rng = stream_rng(seed, AUGMENT_STREAM, epoch, step)
    params = draw_params(cfg, image_size, layout.global_batch, rng)
    if degrade_fr:
        return params
    flags = params.flags.copy()
    flags[: layout.fr_batch] = False
    return dataclasses.replace(params, flags=flags)
