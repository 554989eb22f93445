"""The whole IG-FIQA objective on one process against the dense reference step."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.config import LossConfig, ModelConfig, VarianceConfig
from pipeline.method.model import build_model
from pipeline.method.objective import IGFIQAObjective
from pipeline.training.schedules import alpha_at
from tests import dense_reference as ref

NUM_CLASSES, DIM = 7, 16


def _batch(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    fr_emb = torch.randn(10, DIM, generator=g)
    fr_y = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])
    reg_emb = torch.randn(8, DIM, generator=g)
    reg_q = torch.rand(8, generator=g)
    reg_y = torch.tensor([6, 6, 5, 1, 0, 2, 2, 3])
    return fr_emb, fr_y, reg_emb, reg_q, reg_y


CASES = list(
    itertools.product(
        ["ig", "cr"], ["fr", "reg"], ["update_then_weigh", "weigh_then_update"], ["sequential", "mean"]
    )
)


@pytest.mark.parametrize(("mode", "update_from", "order", "fold"), CASES)
def test_three_steps_match_dense_reference(mode: str, update_from: str, order: str, fold: str) -> None:
    loss_cfg = LossConfig(mode=mode)
    var_cfg = VarianceConfig(update_from=update_from, order=order, fold=fold)
    objective = IGFIQAObjective(NUM_CLASSES, DIM, loss_cfg, var_cfg, seed=2).train()
    table = torch.ones(NUM_CLASSES)
    for step in range(3):
        fr_emb, fr_y, reg_emb, reg_q, reg_y = _batch(step)
        fr_emb.requires_grad_(True)
        reg_q.requires_grad_(True)
        weight_ref = objective.classifier.weight.detach().clone().requires_grad_(True)
        fr_ref = fr_emb.detach().clone().requires_grad_(True)
        q_ref = reg_q.detach().clone().requires_grad_(True)
        progress = step / 4
        expected = ref.objective_step(
            weight_ref, table, fr_ref, fr_y, reg_emb, q_ref, reg_y, progress,
            mode=mode, update_from=update_from, order=order, fold=fold,
        )  # fmt: skip
        objective.classifier.weight.grad = None
        out = objective(fr_emb, fr_y, reg_emb, reg_q, reg_y, alpha_at(progress, VarianceConfig()))
        out.total.backward()
        expected["total"].backward()
        table = expected["table"]

        for name in ("loss_arc", "loss_ig", "total", "cr", "ccs", "nnccs", "weights"):
            # z-scores divide by σ_v, which amplifies float32 rounding of the table: 1e-5 absolute
            torch.testing.assert_close(getattr(out, name), expected[name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(objective.variance.values, table, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fr_emb.grad, fr_ref.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(reg_q.grad, q_ref.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(objective.classifier.weight.grad, weight_ref.grad, rtol=1e-4, atol=1e-6)
        if mode == "cr":
            assert (out.weights == 1).all()
    assert not torch.equal(objective.variance.values, torch.ones(NUM_CLASSES))


def test_ig_weights_change_the_loss_after_updates() -> None:
    # Three identical steps: in "ig" mode some weights drop below 1, so L_IG < L_CR.
    losses = {}
    for mode in ("ig", "cr"):
        objective = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(mode=mode), VarianceConfig(), seed=2).train()
        for _ in range(3):
            out = objective(*_batch(0), alpha=0.9)
        losses[mode] = float(out.loss_ig)
        if mode == "ig":
            assert (out.weights < 1).any() and (out.weights >= 0).all()
    assert losses["ig"] < losses["cr"]


def test_eval_mode_leaves_the_table_alone_and_sum_reduction() -> None:
    objective = IGFIQAObjective(
        NUM_CLASSES, DIM, LossConfig(ig_reduction="sum"), VarianceConfig(), seed=2
    ).eval()
    fr_emb, fr_y, reg_emb, reg_q, reg_y = _batch(0)
    out = objective(fr_emb, fr_y, reg_emb, reg_q, reg_y, 0.95)
    torch.testing.assert_close(objective.variance.values, torch.ones(NUM_CLASSES))
    expected = ref.ig_loss(reg_q, out.cr, torch.ones(8), 0.5, "sum")  # σ = 0 → weights 1
    torch.testing.assert_close(out.loss_ig, expected)


def test_state_round_trip_through_the_objective() -> None:
    objective = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(), VarianceConfig(), seed=2).train()
    opt = torch.optim.SGD(objective.parameters(), lr=0.1, momentum=0.9)
    objective(*_batch(0), alpha=0.91).total.backward()
    opt.step()
    state = objective.full_state(opt)
    assert set(state) == {"classifier", "classifier_momentum", "variance"}
    fresh = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(), VarianceConfig(), seed=9)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh.load_full_state(state, fresh_opt)
    torch.testing.assert_close(fresh.variance.values, objective.variance.values)
    torch.testing.assert_close(fresh.classifier.weight.detach(), objective.classifier.weight.detach())


def test_with_the_mini_backbone_and_the_gradient_switch() -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 112, 112)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for to_backbone in (True, False):
        model = build_model(
            ModelConfig(backbone="iresnet_mini", embedding_size=DIM, head_init="uniform"),
            quality_grad_to_backbone=to_backbone,
        )
        objective = IGFIQAObjective(4, DIM, LossConfig(lambda_ig=10.0), VarianceConfig(), seed=0).train()
        emb, quality = model(images)
        out = objective(emb[:4], labels[:4], emb[4:], quality[4:], labels[4:], 0.9)
        # the regression loss alone: reaches the backbone only when allowed
        model.zero_grad()
        out.loss_ig.backward(retain_graph=True)
        reached = model.backbone.fc.weight.grad is not None and bool(
            model.backbone.fc.weight.grad.abs().sum() > 0
        )
        assert reached is to_backbone
        assert model.head.weight.grad.abs().sum() > 0
        out.total.backward()
        assert torch.isfinite(model.backbone.conv1.weight.grad).all()


def test_mismatched_regression_half_is_refused() -> None:
    objective = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(), VarianceConfig())
    fr_emb, fr_y, reg_emb, reg_q, reg_y = _batch(0)
    with pytest.raises(ValueError, match="regression half"):
        objective(fr_emb, fr_y, reg_emb, reg_q[:5], reg_y, 0.9)


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_face_recognition_only_is_the_margin_loss_alone(margin: str) -> None:
    # mode fr: total = L_Arc exactly (the dense reference's margin loss, and the same number the ig
    # objective's classifier gives), no L_IG, empty regression outputs; the table follows the FR half
    fr_emb, fr_y, reg_emb, reg_q, reg_y = _batch(0)
    loss_cfg = LossConfig(mode="fr", margin=margin)
    objective = IGFIQAObjective(NUM_CLASSES, DIM, loss_cfg, VarianceConfig(), seed=2).train()
    ig = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(margin=margin), VarianceConfig(), seed=2).train()
    no_reg = torch.zeros(0, DIM), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    fr_in = fr_emb.clone().requires_grad_(True)
    out = objective(fr_in, fr_y, *no_reg, alpha=0.9)
    expected = ref.margin_loss(fr_emb, fr_y, objective.classifier.weight.detach(), margin=margin)
    torch.testing.assert_close(out.loss_arc, expected)
    assert out.total is out.loss_arc and float(out.loss_ig) == 0.0
    assert all(t.numel() == 0 for t in (out.cr, out.ccs, out.nnccs, out.weights)) and out.fr_ccs.numel() == 10
    torch.testing.assert_close(out.loss_arc, ig(fr_emb, fr_y, reg_emb, reg_q, reg_y, alpha=0.9).loss_arc)
    assert not torch.equal(objective.variance.values, torch.ones(NUM_CLASSES))
    out.total.backward()
    assert fr_in.grad is not None and fr_in.grad.abs().sum() > 0


def test_face_recognition_only_refuses_a_regression_half() -> None:
    objective = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(mode="fr"), VarianceConfig(), seed=2)
    with pytest.raises(ValueError, match="without a regression half, got 8 regression samples"):
        objective(*_batch(0), alpha=0.9)
    with pytest.raises(ValueError, match="update_from must be 'fr'"):
        IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(mode="fr"), VarianceConfig(update_from="reg"))


@pytest.mark.gpu
def test_cuda_step_matches_cpu() -> None:
    cpu = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(), VarianceConfig(), seed=2).train()
    gpu = IGFIQAObjective(NUM_CLASSES, DIM, LossConfig(), VarianceConfig(), seed=2).train().cuda()
    for step in range(2):
        batch = _batch(step)
        out_cpu = cpu(*batch, alpha=0.95)
        out_gpu = gpu(*(t.cuda() for t in batch), alpha=0.95)
        for name in ("loss_arc", "loss_ig", "cr", "weights"):
            torch.testing.assert_close(
                getattr(out_gpu, name).cpu(), getattr(out_cpu, name), rtol=1e-4, atol=1e-5
            )
    torch.testing.assert_close(gpu.variance.values.cpu(), cpu.variance.values, rtol=1e-5, atol=1e-6)
