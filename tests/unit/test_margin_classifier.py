"""The sharded margin classifier on one process against the dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.method.margin_classifier import (
    DistributedSoftmaxCrossEntropy,
    ParallelMarginClassifier,
    _init_rows,
)
from pipeline.parallel.sharding import class_range
from tests import dense_reference as ref


def _classifier(num_classes: int = 9, dim: int = 16, **kwargs) -> ParallelMarginClassifier:
    return ParallelMarginClassifier(num_classes, dim, seed=1, **kwargs)


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_loss_and_gradients_match_dense_reference(margin: str) -> None:
    torch.manual_seed(0)
    clf = _classifier(margin=margin)
    emb = torch.randn(12, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 2, 2, 5, 8, 8, 3, 4, 6, 7])  # repeated labels
    out = clf(emb, labels)
    out.loss.backward()

    emb_ref = emb.detach().clone().requires_grad_(True)
    w_ref = clf.weight.detach().clone().requires_grad_(True)
    expected = ref.margin_loss(emb_ref, labels, w_ref, margin=margin)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.grad, emb_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(clf.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.ccs, ref.ccs_nnccs(emb, labels, clf.weight)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.labels, labels)


def test_arcface_fallback_past_pi_minus_m() -> None:
    # Embeddings pointing away from their own prototype (θ > π − m) take the linear fallback.
    clf = _classifier(num_classes=4, dim=4)
    with torch.no_grad():
        clf.weight.copy_(torch.eye(4))
    emb = torch.tensor([[-1.0, 0.05, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    cos_target = torch.nn.functional.normalize(emb.detach(), dim=1)[:, 0]
    assert cos_target[0] < math.cos(math.pi - 0.5) < cos_target[1]
    out = clf(emb, labels)
    expected = ref.margin_loss(emb.detach(), labels, clf.weight.detach())
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_distributed_cross_entropy_matches_torch_and_gradcheck() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, dtype=torch.float64) * 20).requires_grad_(True)
    target = torch.tensor([0, 6, 3, 3, 1])
    loss = DistributedSoftmaxCrossEntropy.apply(logits, target, None)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target))
    assert torch.autograd.gradcheck(
        lambda x: DistributedSoftmaxCrossEntropy.apply(x, target, None), (logits,)
    )


def test_similarity_stats_match_dense_reference() -> None:
    torch.manual_seed(0)
    clf = _classifier()
    emb = torch.randn(10, 16)
    labels = torch.tensor([0, 0, 1, 4, 4, 4, 8, 7, 2, 3])
    stats = clf.similarity_stats(emb, labels)
    ccs, nnccs = ref.ccs_nnccs(emb, labels, clf.weight)
    torch.testing.assert_close(stats.ccs, ccs)
    torch.testing.assert_close(stats.nnccs, nnccs)


def test_nnccs_is_negative_when_every_negative_cosine_is() -> None:
    clf = _classifier(num_classes=4, dim=4)
    with torch.no_grad():
        clf.weight.copy_(torch.eye(4))
    # e_y − 0.2·Σ_{j≠y} e_j: positive to its class, negative to all others
    emb = torch.full((4, 4), -0.2) + 1.2 * torch.eye(4)
    labels = torch.arange(4)
    stats = clf.similarity_stats(emb, labels)
    ccs, nnccs = ref.ccs_nnccs(emb, labels, clf.weight)
    expected_cos = -0.2 / math.sqrt(1 + 3 * 0.04)
    torch.testing.assert_close(stats.nnccs, torch.full((4,), expected_cos))
    torch.testing.assert_close(stats.nnccs, nnccs)
    torch.testing.assert_close(stats.ccs, ccs)
    assert (stats.nnccs < 0).all()  # not floored at 0 as CR-FIQA's −1e-12 mask would


def test_prototype_init_does_not_depend_on_world_size() -> None:
    full = _init_rows(0, 10_000, 8, 0.01, seed=5)
    assert abs(float(full.std()) - 0.01) < 5e-4
    for world in (2, 3, 7):
        parts = [_init_rows(*class_range(10_000, r, world), 8, 0.01, seed=5) for r in range(world)]
        torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)
    assert not torch.equal(_init_rows(0, 10, 8, 0.01, seed=6), full[:10])


def test_state_round_trip_with_momentum() -> None:
    torch.manual_seed(0)
    clf = _classifier()
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
    clf(torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 5])).loss.backward()
    opt.step()
    state = clf.full_state(opt)
    assert state["classifier"].shape == (9, 16) and state["classifier_momentum"].shape == (9, 16)

    other = _classifier()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other.load_full_state(state, other_opt)
    torch.testing.assert_close(other.weight.detach(), clf.weight.detach())
    torch.testing.assert_close(
        other_opt.state[other.weight]["momentum_buffer"], opt.state[clf.weight]["momentum_buffer"]
    )
    with pytest.raises(ValueError, match=r"shape \(8, 16\), expected \(9, 16\)"):
        other.load_full_state({"classifier": torch.zeros(8, 16)})


def test_bad_labels_and_sizes_are_refused() -> None:
    clf = _classifier()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\)"):
        clf(torch.randn(2, 16), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="at least"):
        ParallelMarginClassifier(1, 16)
    with pytest.raises(ValueError, match="unknown margin"):
        ParallelMarginClassifier(4, 16, margin="sphereface")  # type: ignore[arg-type]


def test_labels_outside_the_classes_are_refused() -> None:
    head = ParallelMarginClassifier(5, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got min 0 max 5"):
        head(torch.randn(2, 8), torch.tensor([0, 5]))
