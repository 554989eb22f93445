"""Batch separation (paper §3.2): the FR half never depends on the regression half's pixels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.config import LossConfig, ModelConfig, VarianceConfig
from pipeline.method.model import FIQAModel, build_model, regression_batch_norm
from pipeline.method.objective import IGFIQAObjective

NUM_CLASSES, DIM = 5, 16


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    reg = torch.randn(6, 3, 112, 112, generator=g)
    perturbed = reg.clone()
    perturbed[:, :, 20:60, 30:90] = 0.0  # an erased patch, brighter and darker halves
    perturbed[:3] = perturbed[:3] * 0.3 - 0.5
    perturbed[3:] = perturbed[3:] * 1.7 + 0.4
    return {
        "fr": torch.randn(6, 3, 112, 112, generator=g),
        "fr_y": torch.tensor([0, 1, 2, 3, 4, 1]),
        "reg": reg,
        "reg_perturbed": perturbed,
        "reg_y": torch.tensor([4, 3, 2, 1, 0, 0]),
    }


def _step(
    model: FIQAModel, objective: IGFIQAObjective, fr: torch.Tensor, reg: torch.Tensor, data: dict
) -> dict[str, object]:
    """One training forward of copies of `model` and `objective`; what must not depend on `reg`."""
    model, objective = copy.deepcopy(model).train(), copy.deepcopy(objective).train()
    embeddings, quality = model(fr, reg)
    n_fr = fr.shape[0]
    out = objective(embeddings[:n_fr], data["fr_y"], embeddings[n_fr:], quality[n_fr:], data["reg_y"], 0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss_arc, params, allow_unused=True)
    return {
        "fr_embeddings": embeddings[:n_fr].detach(),
        "reg_embeddings": embeddings[n_fr:].detach(),
        "loss_arc": out.loss_arc.detach(),
        "grads": [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)],
        "buffers": {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k},
    }


def _setup(forward: str, reg_bn: str = "running") -> tuple[FIQAModel, IGFIQAObjective]:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(backbone="iresnet_mini", embedding_size=DIM, forward=forward, reg_bn=reg_bn)
    )
    objective = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(), VarianceConfig(), seed=1)
    return model, objective


@pytest.mark.parametrize("reg_bn", ["running", "batch"])
def test_separate_forward_makes_the_fr_half_independent_of_the_regression_half(reg_bn: str) -> None:
    data = _inputs()
    model, objective = _setup("separate", reg_bn)
    a = _step(model, objective, data["fr"], data["reg"], data)
    b = _step(model, objective, data["fr"], data["reg_perturbed"], data)
    assert not torch.equal(a["reg_embeddings"], b["reg_embeddings"])  # the perturbation reaches the model
    assert torch.equal(a["fr_embeddings"], b["fr_embeddings"])
    assert torch.equal(a["loss_arc"], b["loss_arc"])
    assert len(a["grads"]) == len(b["grads"]) > 10
    for ga, gb in zip(a["grads"], b["grads"]):
        assert torch.equal(ga, gb)
    assert a["buffers"].keys() == b["buffers"].keys() and len(a["buffers"]) > 10
    for key in a["buffers"]:
        assert torch.equal(a["buffers"][key], b["buffers"][key]), key


def test_joint_forward_mixes_the_halves() -> None:
    """The ablation: one forward of both halves, so the same perturbation changes the FR half."""
    data = _inputs()
    model, objective = _setup("joint")
    a = _step(model, objective, data["fr"], data["reg"], data)
    b = _step(model, objective, data["fr"], data["reg_perturbed"], data)
    assert (a["fr_embeddings"] - b["fr_embeddings"]).abs().max() > 1e-2
    assert not torch.equal(a["loss_arc"], b["loss_arc"])
    assert any(not torch.equal(ga, gb) for ga, gb in zip(a["grads"], b["grads"]))
    assert not torch.equal(
        a["buffers"]["backbone.bn1.running_mean"], b["buffers"]["backbone.bn1.running_mean"]
    )


def test_running_stats_come_from_the_fr_half_only() -> None:
    data = _inputs()
    model, _ = _setup("separate")
    alone = copy.deepcopy(model).train()
    alone.backbone(data["fr"])
    model.train()(data["fr"], data["reg"])
    for (name, buffer), expected in zip(model.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(buffer, expected), name


def test_regression_half_bn_modes() -> None:
    """running: the regression half's embeddings are the eval-mode ones; batch: its own batch statistics."""
    data = _inputs()
    for reg_bn in ("running", "batch"):
        model, _ = _setup("separate", reg_bn)
        model.train()
        reference = copy.deepcopy(model)
        embeddings, quality = model(data["fr"], data["reg"])
        # the reference sees the FR half first (same running statistics), then the regression half
        reference.train().backbone(data["fr"])
        if reg_bn == "running":
            expected = reference.eval().backbone(data["reg"])
        else:
            expected = reference.train().backbone(data["reg"])  # batch statistics (this also updates its
            # running ones, which the model under test must not do; checked above)
        torch.testing.assert_close(embeddings[6:], expected, rtol=0, atol=0)
        torch.testing.assert_close(quality, model.head(embeddings).squeeze(1))
        assert model.training and all(m.training for m in model.modules())
        assert all(
            m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        )


def test_regression_batch_norm_restores_flags_and_refuses_unknown_modes() -> None:
    model, _ = _setup("separate")
    model.train()
    model.backbone.bn1.eval()  # a layer frozen on purpose keeps its own flag
    with regression_batch_norm(model.backbone, "batch"):
        assert not model.backbone.bn1.track_running_stats
    assert not model.backbone.bn1.training and model.backbone.layer1.training
    assert model.backbone.bn1.track_running_stats
    with pytest.raises(ValueError, match="reg_bn"), regression_batch_norm(model.backbone, "sync"):
        pass
    with pytest.raises(ValueError, match=r"model\.forward"):
        FIQAModel(nn.Identity(), DIM, forward_mode="both")  # type: ignore[arg-type]


def test_single_input_forward_is_unchanged() -> None:
    """Inference (and `igfiqa eval`) calls model(images): one forward, whatever the mode."""
    data = _inputs()
    model, _ = _setup("separate")
    model.eval()
    embeddings, quality = model(data["fr"])
    torch.testing.assert_close(embeddings, model.backbone(data["fr"]), rtol=0, atol=0)
    torch.testing.assert_close(quality, model.head(embeddings).squeeze(1), rtol=0, atol=0)
