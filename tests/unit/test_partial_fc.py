"""Partial FC on one process: sample rate 1 is the full classifier, the sample's rows alone move,
the exact NNCCS is the full-table one, and an all-rows sample gives the full classifier's numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import LossConfig, PartialFCConfig, VarianceConfig, config_from_dict
from pipeline.config_loader import ConfigError
from pipeline.method import partial_fc
from pipeline.method.margin_classifier import ParallelMarginClassifier
from pipeline.method.objective import IGFIQAObjective
from pipeline.method.partial_fc import draw_rows, sample_count

C, D = 50, 16


def _sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _batch(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def test_sample_rate_one_is_the_full_classifier_bit_for_bit() -> None:
    """loss.partial_fc at rate 1 (either NNCCS mode) changes no bit of the loss, the gradients or
    two SGD steps against the default config: the code path is the full classifier's."""
    results = []
    for cfg in (LossConfig(), LossConfig(partial_fc=PartialFCConfig(sample_rate=1.0, nnccs="sampled"))):
        objective = IGFIQAObjective(C, D, cfg, VarianceConfig(), seed=4).train()
        opt = _sgd(objective.parameters())
        record = []
        for step in range(2):
            emb, labels = _batch(step)
            reg, reg_labels = _batch(step + 10)
            emb.requires_grad_(True)
            quality = torch.linspace(0.1, 0.9, 8)
            out = objective(emb, labels, reg, quality, reg_labels, 0.9, step=step)
            opt.zero_grad()
            out.total.backward()
            assert objective.classifier.sampled_rows is None
            record += [
                out.total.detach(),
                out.nnccs,
                out.cr,
                emb.grad,
                objective.classifier.weight.grad.clone(),
            ]
            opt.step()
            objective.classifier.step_sampled_rows(opt)
        record += [
            objective.classifier.weight.detach(),
            opt.state[objective.classifier.weight]["momentum_buffer"],
        ]
        results.append(record)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_sample_of_every_row_gives_the_full_classifiers_numbers() -> None:
    """The sampled path (own leaf, row SGD) with all rows = the dense path with torch's SGD."""
    full = ParallelMarginClassifier(C, D, seed=2)
    sampled = ParallelMarginClassifier(C, D, seed=2, sample_rate=0.5, nnccs="sampled")
    full_opt, sampled_opt = _sgd(full.parameters()), _sgd(sampled.parameters())
    every_row = torch.arange(C)
    for step in range(3):
        emb, labels = _batch(step)
        emb_a, emb_b = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        out_a, out_b = full(emb_a, labels), sampled(emb_b, labels, rows=every_row)
        torch.testing.assert_close(out_b.loss, out_a.loss)
        torch.testing.assert_close(out_b.ccs, out_a.ccs)
        stats_a, stats_b = full.similarity_stats(emb, labels), sampled.similarity_stats(emb, labels)
        torch.testing.assert_close(stats_b.ccs, stats_a.ccs)
        torch.testing.assert_close(stats_b.nnccs, stats_a.nnccs)
        full_opt.zero_grad()
        sampled_opt.zero_grad()
        out_a.loss.backward()
        out_b.loss.backward()
        torch.testing.assert_close(emb_b.grad, emb_a.grad)
        torch.testing.assert_close(sampled.sampled_grad, full.weight.grad)
        assert sampled.weight.grad is None  # the parameter itself never gets a [C, D] gradient
        full_opt.step()
        sampled_opt.step()
        sampled.step_sampled_rows(sampled_opt)
        torch.testing.assert_close(sampled.weight.detach(), full.weight.detach())
        torch.testing.assert_close(
            sampled_opt.state[sampled.weight]["momentum_buffer"],
            full_opt.state[full.weight]["momentum_buffer"],
        )


def test_unsampled_rows_and_their_momentum_do_not_move() -> None:
    clf = ParallelMarginClassifier(C, D, seed=3, sample_rate=0.1)
    opt = _sgd(clf.parameters())
    # give every row a momentum first, so that "untouched" is not "still zero"
    opt.state[clf.weight]["momentum_buffer"] = torch.randn(C, D) * 0.01
    emb, labels = _batch(1, n=4)
    before_w = clf.weight.detach().clone()
    before_m = opt.state[clf.weight]["momentum_buffer"].clone()
    out = clf(emb, labels, step=7)
    out.loss.backward()
    opt.step()
    clf.step_sampled_rows(opt)
    rows = clf.sampled_rows
    assert rows is not None and rows.numel() == sample_count(C, 0.1, 4) == 5
    assert set(labels.tolist()) <= set(rows.tolist())  # every positive is in the sample
    unsampled = torch.ones(C, dtype=torch.bool)
    unsampled[rows] = False
    after_m = opt.state[clf.weight]["momentum_buffer"]
    assert torch.equal(clf.weight.detach()[unsampled], before_w[unsampled])
    assert torch.equal(after_m[unsampled], before_m[unsampled])
    assert not torch.equal(clf.weight.detach()[rows], before_w[rows])
    # the step consumed the sample: a second call changes nothing
    assert clf.sampled_grad is None
    snapshot = clf.weight.detach().clone()
    clf.step_sampled_rows(opt)
    assert torch.equal(clf.weight.detach(), snapshot)


def test_the_sampled_rows_follow_sgd() -> None:
    clf = ParallelMarginClassifier(C, D, seed=3, sample_rate=0.2)
    opt = _sgd(clf.parameters())
    momentum = torch.randn(C, D) * 0.01
    opt.state[clf.weight]["momentum_buffer"] = momentum.clone()
    w0 = clf.weight.detach().clone()
    emb, labels = _batch(2)
    clf(emb, labels, step=3).loss.backward()
    rows, grad = clf.sampled_rows, clf.sampled_grad.clone()
    clf.step_sampled_rows(opt)
    d = grad + 5e-4 * w0[rows]
    m = 0.9 * momentum[rows] + d
    torch.testing.assert_close(opt.state[clf.weight]["momentum_buffer"][rows], m)
    torch.testing.assert_close(clf.weight.detach()[rows], w0[rows] - 0.1 * m)


def test_the_draw_is_seeded_by_step_and_keeps_every_positive() -> None:
    target = torch.tensor([3, -1, 17, 3, 40, -1])
    a = draw_rows(target, 100, 10, seed=5)
    assert torch.equal(a, draw_rows(target, 100, 10, seed=5))
    assert not torch.equal(a, draw_rows(target, 100, 10, seed=6))
    assert a.numel() == 10 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    assert {3, 17, 40} <= set(a.tolist())
    # the count: ceil(rate × shard), at least the global batch, at most the shard
    assert sample_count(100_000, 0.1, 512) == 10_000
    assert sample_count(1_000, 0.1, 512) == 512
    assert sample_count(100, 0.1, 512) == 100


def test_a_classifier_and_its_training_step_draw_other_rows_each_step() -> None:
    clf = ParallelMarginClassifier(C, D, seed=3, sample_rate=0.2)
    emb, labels = _batch(0)
    clf(emb, labels, step=0)
    first = clf.sampled_rows
    clf(emb, labels, step=1)
    assert not torch.equal(first, clf.sampled_rows)
    clf(emb, labels, step=0)
    assert torch.equal(first, clf.sampled_rows)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 8 * 7])  # one chunk; chunks of 7 rows
def test_exact_nnccs_is_the_full_tables(monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
    monkeypatch.setattr(partial_fc, "_NNCCS_CHUNK_ELEMENTS", chunk_elements)
    full = ParallelMarginClassifier(C, D, seed=6)
    exact = ParallelMarginClassifier(C, D, seed=6, sample_rate=0.1, nnccs="exact")
    sampled = ParallelMarginClassifier(C, D, seed=6, sample_rate=0.1, nnccs="sampled")
    emb, labels = _batch(4)
    reg, reg_labels = _batch(5)
    for clf in (exact, sampled):
        clf(emb, labels, step=2)  # the step's sample (sampled NNCCS uses it)
    want = full.similarity_stats(reg, reg_labels)
    got = exact.similarity_stats(reg, reg_labels)
    torch.testing.assert_close(got.nnccs, want.nnccs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.ccs, want.ccs, rtol=0, atol=1e-6)
    # sampled: the max over the sample's rows other than the own class, never above the exact one
    cheap = sampled.similarity_stats(reg, reg_labels)
    cos = torch.nn.functional.normalize(reg) @ torch.nn.functional.normalize(sampled.weight.detach()).T
    rows = sampled.sampled_rows
    masked = cos[:, rows].masked_fill(rows[None, :] == reg_labels[:, None], float("-inf"))
    torch.testing.assert_close(cheap.nnccs, masked.amax(dim=1), rtol=0, atol=1e-6)
    assert (cheap.nnccs <= got.nnccs + 1e-6).all() and (cheap.nnccs < got.nnccs - 1e-6).any()


@pytest.mark.parametrize("chunk_elements", [1 << 24, 4 * 7])  # one chunk; chunks of 7 rows
def test_max_other_cosine_masks_only_the_own_column(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int
) -> None:
    """Bit-equal to masking every [B, rows] entry of the own class and clamping the whole matrix;
    a sample outside the shard (−1) masks nothing; no other row at all gives −inf."""
    monkeypatch.setattr(partial_fc, "_NNCCS_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(9)
    unit = torch.nn.functional.normalize(torch.randn(4, D, generator=g), dim=1)
    weight = torch.randn(C, D, generator=g)
    target = torch.tensor([0, 6, 7, -1])  # a chunk's first and last rows, the next chunk's first, not owned
    cos = (unit @ torch.nn.functional.normalize(weight, dim=1).T).clamp(-1.0, 1.0)
    want = cos.masked_fill(torch.arange(C)[None, :] == target[:, None], float("-inf")).amax(dim=1)
    assert torch.equal(partial_fc.max_other_cosine(unit, weight, target, None), want)
    alone = partial_fc.max_other_cosine(unit[:1], weight[:1], torch.tensor([0]), None)
    assert torch.equal(alone, torch.tensor([float("-inf")]))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"loss\.partial_fc\.sample_rate: 0\.0 must lie in \(0, 1\]"):
        config_from_dict({"loss": {"partial_fc": {"sample_rate": 0.0}}})
    with pytest.raises(ConfigError, match=r"loss\.partial_fc\.nnccs"):
        config_from_dict({"loss": {"partial_fc": {"nnccs": "approx"}}})
    with pytest.raises(ValueError, match="need sample_rate < 1"):
        ParallelMarginClassifier(C, D)(*_batch(0), rows=torch.arange(C))
    clf = ParallelMarginClassifier(C, D, sample_rate=0.5)
    with pytest.raises(ValueError, match="leave out a positive"):
        clf(torch.randn(2, D), torch.tensor([1, 2]), rows=torch.tensor([0, 1, 3]))
    nesterov = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    clf(torch.randn(2, D), torch.tensor([1, 2])).loss.backward()
    with pytest.raises(ValueError, match="Nesterov"):
        clf.step_sampled_rows(nesterov)


def test_a_training_step_with_partial_fc_moves_only_the_sample() -> None:
    from pipeline.training.schedules import StepValues
    from pipeline.training.step import TrainStep

    config = config_from_dict(
        {
            "data": {"fr_batch": 4, "reg_batch": 4},
            "model": {"backbone": "iresnet_mini", "embedding_size": 16},
            "loss": {"partial_fc": {"sample_rate": 0.1}},
            "run": {"device": "cpu"},
        }
    )
    torch.manual_seed(0)
    step = TrainStep(config, num_classes=60, device=torch.device("cpu"), world_size=1)
    step.train()
    before = copy.deepcopy(step.objective.classifier.weight.detach())
    images, labels = torch.randn(8, 3, 112, 112), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out, _ = step(images[:4], labels[:4], images[4:], labels[4:], StepValues(lr=0.05, alpha=0.9, step=11))
    rows = step.objective.classifier.sampled_rows
    assert rows is not None and rows.numel() == 6 and {0, 1, 2, 3} <= set(rows.tolist())
    moved = (step.objective.classifier.weight.detach() != before).any(dim=1)
    assert torch.equal(moved.nonzero().squeeze(1), rows)
    assert torch.isfinite(out.total) and out.nnccs.shape == (4,)
