"""Backbone registry, iResNet shapes and parameter counts, the FIQA model's head."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.method.backbones import available_backbones, build_backbone
from pipeline.method.backbones.iresnet import IResNet
from pipeline.method.model import FIQAModel, build_model


def test_registry_lists_the_family() -> None:
    assert available_backbones() == [
        "iresnet100",
        "iresnet18",
        "iresnet200",
        "iresnet34",
        "iresnet50",
        "iresnet_mini",
        "iresnet_mini_nobn",
        "iresnet_small",
        "iresnet_tiny",
    ]
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9'.*iresnet50"):
        build_backbone("resnet9")


@pytest.mark.parametrize(
    ("name", "params"),
    # arcface_torch's iresnet at 512-d: r18 24.0M, r34 34.1M, r50 43.6M, r100 65.2M, r200 118.8M
    [
        ("iresnet18", 24_025_600),
        ("iresnet34", 34_139_328),
        ("iresnet50", 43_590_848),
        ("iresnet100", 65_156_160),
        ("iresnet200", 118_833_920),
    ],
)
def test_parameter_counts_match_the_reference(name: str, params: int) -> None:
    model = build_backbone(name)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", ["iresnet18", "iresnet_mini", "iresnet_tiny", "iresnet_small"])
def test_forward_shape_and_frozen_embedding_scale(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=128, dropout=0.2).train()
    out = model(torch.randn(3, 3, 112, 112))
    assert out.shape == (3, 128)
    assert torch.isfinite(out).all()
    assert not model.features.weight.requires_grad  # BN'd FC: only the shift learns
    out.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_wrong_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"112×112 images, got shape \(1, 3, 96, 96\)"):
        build_backbone("iresnet_mini")(torch.randn(1, 3, 96, 96))


def test_mini_is_small() -> None:
    model = build_backbone("iresnet_mini")
    assert sum(p.numel() for p in model.parameters()) < 4_000_000


def _conv_macs(model: torch.nn.Module) -> int:
    """Multiply-accumulates of the convolutions for one 112×112 image."""
    macs = []

    def count(module: torch.nn.Module, _: tuple, out: torch.Tensor) -> None:
        macs.append(out[0].numel() * module.weight[0].numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 112, 112))
    for hook in hooks:
        hook.remove()
    return sum(macs)


def test_tiny_has_a_stride_two_stem_and_a_third_of_the_work() -> None:
    tiny, mini = build_backbone("iresnet_tiny"), build_backbone("iresnet_mini")
    assert tiny.conv1.stride == (2, 2) and tiny.layer4[0].conv2.stride == (1, 1)
    assert 3.0 < _conv_macs(mini) / _conv_macs(tiny) < 3.6  # 109 M vs 33 M per image


def test_small_is_tiny_twice_as_deep() -> None:
    tiny, small = build_backbone("iresnet_tiny"), build_backbone("iresnet_small")
    assert [len(stage) for stage in (small.layer1, small.layer2, small.layer3, small.layer4)] == [2, 2, 2, 2]
    assert small.conv1.stride == (2, 2) and small.channels_last
    assert 1.6 < _conv_macs(small) / _conv_macs(tiny) < 2.0  # 59 M vs 33 M per image (fc aside)


def test_channels_last_gives_the_same_embeddings() -> None:
    torch.manual_seed(0)
    tiny = build_backbone("iresnet_tiny", embedding_size=32).eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        fast = tiny(images)
        tiny.channels_last = False
        plain = tiny(images)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_quality_head_starts_at_zero_by_default() -> None:
    model = build_model(ModelConfig(backbone="iresnet_mini", embedding_size=64))
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    uniform = build_model(ModelConfig(backbone="iresnet_mini", embedding_size=64, head_init="uniform"))
    assert uniform.head.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="head_init"):
        build_model(ModelConfig(backbone="iresnet_mini", embedding_size=64, head_init="normal"))  # type: ignore[arg-type]


def test_without_batch_norm_there_is_no_normalisation_layer() -> None:
    model = build_backbone("iresnet_mini_nobn", embedding_size=32)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with_bn = build_backbone("iresnet_mini", embedding_size=32)
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in with_bn.modules()) > 10
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 32)


def test_channels_last_backbones_keep_their_weights_in_that_layout() -> None:
    model = build_backbone("iresnet_tiny", embedding_size=32)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_strides_must_reach_seven_by_seven() -> None:
    with pytest.raises(ValueError, match="multiply to 16"):
        IResNet((1, 1, 1, 1), (8, 8, 8, 8), stem_width=8, stem_stride=2)


def test_fiqa_model_head_and_gradient_switch() -> None:
    torch.manual_seed(0)
    # a uniformly drawn head: the default zero head passes no gradient to the backbone at step 0
    cfg = ModelConfig(backbone="iresnet_mini", embedding_size=64, head_init="uniform")
    images = torch.randn(4, 3, 112, 112)
    for to_backbone in (True, False):
        model = build_model(cfg, quality_grad_to_backbone=to_backbone)
        assert isinstance(model, FIQAModel)
        assert isinstance(model.head, torch.nn.Linear) and model.head.weight.shape == (1, 64)
        embeddings, quality = model(images)
        assert embeddings.shape == (4, 64) and quality.shape == (4,)
        torch.testing.assert_close(quality, model.head(embeddings).squeeze(1))
        quality.sum().backward()
        backbone_grad = model.backbone.fc.weight.grad
        assert model.head.weight.grad is not None
        if to_backbone:
            assert backbone_grad is not None and backbone_grad.abs().sum() > 0
        else:
            assert backbone_grad is None


def test_a_head_that_reads_the_norm_sees_what_a_linear_head_on_the_embedding_cannot() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="iresnet_mini", embedding_size=64, head_input="embedding_and_norm")
    model = build_model(cfg).eval()
    assert model.head.weight.shape == (1, 65)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, -1] = 1.0  # the head reads only the norm column
        embeddings, quality = model(torch.randn(4, 3, 112, 112))
    torch.testing.assert_close(quality, embeddings.norm(dim=1) / 8.0)  # ||e|| / sqrt(64)
    # scaling an embedding moves its quality; the paper's head on a centred embedding has no such term
    scaled = torch.cat([embeddings, 2.0 * embeddings])
    with torch.no_grad():
        assert torch.allclose(model._quality(scaled)[4:], 2.0 * quality)
    # the norm's gradient reaches the backbone
    model.train()
    model.head.weight.data.normal_()
    model(torch.randn(4, 3, 112, 112))[1].sum().backward()
    assert model.head.weight.grad[0, -1] != 0 and model.backbone.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="head_input"):
        build_model(ModelConfig(backbone="iresnet_mini", embedding_size=64, head_input="norm"))  # type: ignore[arg-type]
