"""iResNet backbones as used for ArcFace at 112×112 (InsightFace `arcface_torch`).

Each residual block is BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus the
(1×1 conv + BN) shortcut when the shape changes. The stem is a stride-1 conv3×3 +
BN + PReLU; four stages halve the resolution (112 → 7); the head is BN2d →
flatten → dropout → Linear(width·7·7, D) → BatchNorm1d(D) whose scale is fixed
to 1 (only its shift learns), exactly like the reference. Stage depths:
18: 2-2-2-2, 34: 3-4-6-3, 50: 3-4-14-3, 100: 3-13-30-3, 200: 6-26-60-6.

`iresnet_mini` keeps the same design with narrow stages (16-32-64-128) and one
block per stage; `iresnet_tiny` adds a stride-2 stem (and a stride-1 last stage) so the
demo trains on 2 CPU cores in minutes. `IResNet(stem_stride=…, strides=…)` allows any
such arrangement whose strides multiply to 16 (112 → 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.method.backbones import register_backbone

INPUT_SIZE = 112
_STAGES = 4
_OUTPUT_SIDE_SHIFT = 4  # stem and stages halve the resolution four times in all: 112 → 7
BN_EPS = 1e-5


def _norm2d(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels, eps=BN_EPS) if norm else nn.Identity()


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv-BN-PReLU-conv-BN residual block; the second conv carries the stride."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm: bool = True) -> None:
        super().__init__()
        self.bn1 = _norm2d(in_channels, norm)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = _norm2d(channels, norm)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = _norm2d(channels, norm)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                _norm2d(channels, norm),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """Images [N, 3, 112, 112] → embeddings [N, embedding_size]."""

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        *,
        stem_width: int = 64,
        stem_stride: int = 1,
        strides: Sequence[int] = (2, 2, 2, 2),
        channels_last: bool = False,
        embedding_size: int = 512,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != _STAGES or len(widths) != _STAGES or len(strides) != _STAGES:
            raise ValueError(
                f"iResNet needs {_STAGES} stage depths, widths and strides, got {layers} / {widths} / {strides}"
            )
        if stem_stride * math.prod(strides) != 1 << _OUTPUT_SIDE_SHIFT:
            raise ValueError(
                f"stem stride {stem_stride} × stage strides {tuple(strides)} must reduce "
                f"{INPUT_SIZE} to {INPUT_SIZE >> _OUTPUT_SIDE_SHIFT}, i.e. multiply to {1 << _OUTPUT_SIDE_SHIFT}"
            )
        self.channels_last = channels_last
        self.conv1 = _conv3x3(3, stem_width, stem_stride)
        self.bn1 = _norm2d(stem_width, batch_norm)
        self.prelu = nn.PReLU(stem_width)
        stages = []
        in_channels = stem_width
        for depth, width, stride in zip(layers, widths, strides):
            blocks = [IBasicBlock(in_channels, width, stride=stride, norm=batch_norm)]
            blocks += [IBasicBlock(width, width, norm=batch_norm) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = _norm2d(in_channels, batch_norm)
        self.dropout = nn.Dropout(p=dropout)
        side = INPUT_SIZE >> _OUTPUT_SIDE_SHIFT
        self.fc = nn.Linear(in_channels * side * side, embedding_size)
        self.features: nn.Module = nn.BatchNorm1d(embedding_size, eps=BN_EPS) if batch_norm else nn.Identity()
        self.embedding_size = embedding_size
        self._init_weights()
        if channels_last:
            # weights in the inputs' layout: DDP's gradient buckets then match the gradients' strides
            # (otherwise every step warns "Grad strides do not match bucket view strides" and copies)
            self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        # As arcface_torch: conv N(0, 0.1), BN scale 1 / shift 0, the embedding BN's scale frozen at 1.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.features, nn.BatchNorm1d):
            nn.init.ones_(self.features.weight)
            self.features.weight.requires_grad = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"iResNet expects {INPUT_SIZE}×{INPUT_SIZE} images, got shape {tuple(images.shape)}"
            )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


@register_backbone("iresnet18")
def iresnet18(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """iResNet-18."""
    return IResNet((2, 2, 2, 2), embedding_size=embedding_size, dropout=dropout)


@register_backbone("iresnet34")
def iresnet34(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """iResNet-34."""
    return IResNet((3, 4, 6, 3), embedding_size=embedding_size, dropout=dropout)


@register_backbone("iresnet50")
def iresnet50(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """iResNet-50 (protocol S)."""
    return IResNet((3, 4, 14, 3), embedding_size=embedding_size, dropout=dropout)


@register_backbone("iresnet100")
def iresnet100(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """iResNet-100 (protocol L)."""
    return IResNet((3, 13, 30, 3), embedding_size=embedding_size, dropout=dropout)


@register_backbone("iresnet200")
def iresnet200(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """iResNet-200."""
    return IResNet((6, 26, 60, 6), embedding_size=embedding_size, dropout=dropout)


@register_backbone("iresnet_mini")
def iresnet_mini(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """A narrow one-block-per-stage iResNet for CPU demos and tests (~0.1 GMAC per image)."""
    return IResNet(
        (1, 1, 1, 1), (16, 32, 64, 128), stem_width=16, embedding_size=embedding_size, dropout=dropout
    )


@register_backbone("iresnet_mini_nobn")
def iresnet_mini_nobn(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """`iresnet_mini` without BatchNorm layers: for checks that N processes train exactly as one.

    BatchNorm normalises over each rank's share of the batch, so with it N processes only
    approximate one; without it they compute the same step up to float summation order.
    It trains worse: not for real runs.
    """
    return IResNet(
        (1, 1, 1, 1),
        (16, 32, 64, 128),
        stem_width=16,
        embedding_size=embedding_size,
        dropout=dropout,
        batch_norm=False,
    )


@register_backbone("iresnet_tiny")
def iresnet_tiny(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """`iresnet_mini`'s widths with a stride-2 stem (the last stage keeps 7×7): 33 M instead of 109 M
    conv MACs per image, and channels-last, which PyTorch's CPU convolutions run faster. The demo's
    backbone (configs/tiny_cpu.yaml): on one CPU core a training step (forward + backward) took
    0.25–0.38 s for 32 images against 1.2 s for iresnet_mini, so it sees 3–4× more images in
    the same time, which matters more there than resolution in the first block.
    """
    return IResNet(
        (1, 1, 1, 1),
        (16, 32, 64, 128),
        stem_width=16,
        stem_stride=2,
        strides=(2, 2, 2, 1),
        channels_last=True,
        embedding_size=embedding_size,
        dropout=dropout,
    )


@register_backbone("iresnet_small")
def iresnet_small(*, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """`iresnet_tiny` with two blocks per stage (iResNet-18's depths at its widths): a deeper small
    backbone, the second reference matcher's (configs/matchers/synthetic.yaml). On one CPU core a
    training step of 32 images took 1.2-1.5x iresnet_tiny's (0.28 against 0.19-0.23 s).
    """
    return IResNet(
        (2, 2, 2, 2),
        (16, 32, 64, 128),
        stem_width=16,
        stem_stride=2,
        strides=(2, 2, 2, 1),
        channels_last=True,
        embedding_size=embedding_size,
        dropout=dropout,
    )
