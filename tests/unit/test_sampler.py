"""Order of the samples per epoch, rank slices, and the numpy-drawn augmentation plan (no DALI)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import AugmentConfig, BatchLayout
from pipeline.data.augment_plan import DEGRADATIONS, step_params
from pipeline.data.sampler import EpochSampler

SIZE = 112


def sampler_of(num_images: int, fr: int, reg: int, *, world_size: int = 1, rank: int = 0, seed: int = 0):
    return EpochSampler(BatchLayout(fr, reg, num_images, world_size, rank), seed=seed)


def binomial_bounds(n: int, p: float, sigmas: float = 4.0) -> tuple[float, float]:
    spread = sigmas * np.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def test_order_is_a_permutation_reproducible_from_seed_and_epoch() -> None:
    sampler = sampler_of(1000, 8, 8, seed=3)
    order = sampler.order(0)
    assert sorted(order.tolist()) == list(range(1000))
    # numpy's permutation of the epoch's stream: checkpoints of earlier versions resume on the same order
    reference = np.random.default_rng(np.random.SeedSequence([3, 0, 0])).permutation(1000)
    assert order.dtype == np.int64 and np.array_equal(order, reference)
    assert np.array_equal(order, sampler_of(1000, 8, 8, seed=3).order(0))
    assert not np.array_equal(order, sampler.order(1))
    assert not np.array_equal(order, sampler_of(1000, 8, 8, seed=4).order(0))


def test_steps_drop_the_remainder_and_halves_do_not_overlap() -> None:
    sampler = sampler_of(1000, 24, 40)
    assert sampler.layout.steps_per_epoch == 1000 // 64
    seen = []
    for step in range(sampler.layout.steps_per_epoch):
        rows = sampler.global_rows(2, step)
        assert len(rows.fr) == 24 and len(rows.reg) == 40
        assert not set(rows.fr) & set(rows.reg)
        seen += [*rows.fr, *rows.reg]
    assert len(set(seen)) == len(seen) == sampler.layout.steps_per_epoch * 64
    assert np.array_equal(seen, sampler.order(2)[: len(seen)])
    with pytest.raises(IndexError):
        sampler.global_rows(2, sampler.layout.steps_per_epoch)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_are_disjoint_cover_the_epoch_and_concatenate_to_the_global_step(world_size: int) -> None:
    samplers = [sampler_of(500, 8, 16, world_size=world_size, rank=r, seed=1) for r in range(world_size)]
    single = sampler_of(500, 8, 16, seed=1)
    assert {s.layout.steps_per_epoch for s in samplers} == {single.layout.steps_per_epoch}
    covered = []
    for step in range(single.layout.steps_per_epoch):
        parts = [s.rank_rows(0, step) for s in samplers]
        whole = single.global_rows(0, step)
        assert np.array_equal(np.concatenate([p.fr for p in parts]), whole.fr)
        assert np.array_equal(np.concatenate([p.reg for p in parts]), whole.reg)
        for p in parts:
            covered += [*p.fr, *p.reg]
    assert len(covered) == len(set(covered)) == single.layout.steps_per_epoch * 24


def test_an_empty_regression_half_gives_every_row_of_the_epoch_to_the_fr_half() -> None:
    # loss.mode fr: reg_batch 0, each global step is fr_batch rows, split over the ranks
    samplers = [sampler_of(100, 8, 0, world_size=2, rank=r, seed=1) for r in range(2)]
    assert samplers[0].layout.steps_per_epoch == 12  # 100 // 8
    covered = []
    for step in range(12):
        whole = sampler_of(100, 8, 0, seed=1).global_rows(0, step)
        parts = [s.rank_rows(0, step) for s in samplers]
        assert whole.reg.size == 0 and all(p.reg.size == 0 and p.fr.size == 4 for p in parts)
        assert np.array_equal(np.concatenate([p.fr for p in parts]), whole.fr)
        covered += [row for p in parts for row in p.fr]
    assert len(set(covered)) == 96
    assert samplers[1].rank_positions().tolist() == [4, 5, 6, 7]
    plan = step_params(AugmentConfig(p_rescale=1.0), SIZE, seed=0, epoch=0, step=0, layout=samplers[0].layout)
    assert len(plan) == 8 and not plan.flags.any()


def test_single_batch_mode_degrades_the_fr_rows_with_the_same_draws() -> None:
    # data.batch_mode single: the one batch (the FR rows) is degraded at the configured rates; the
    # flips and parameters are those the split layout draws, only the FR rows' flags differ
    cfg = AugmentConfig(p_rescale=0.3, p_erase=0.3, p_color=0.3)
    layout = BatchLayout(4000, 0, num_images=4000)
    single = step_params(cfg, SIZE, seed=3, epoch=1, step=2, layout=layout, degrade_fr=True)
    split = step_params(cfg, SIZE, seed=3, epoch=1, step=2, layout=layout)
    assert not split.flags.any()
    for column in range(3):
        low, high = binomial_bounds(4000, 0.3)
        assert low <= single.flags[:, column].sum() <= high, DEGRADATIONS[column]
    assert np.array_equal(single.flip, split.flip) and np.array_equal(single.color, split.color)
    assert np.array_equal(single.rescale_size, split.rescale_size)


def test_rank_positions_pick_this_ranks_rows_of_the_global_step() -> None:
    sampler = sampler_of(100, 4, 6, world_size=2, rank=1)
    rows = sampler.global_rows(0, 0)
    global_step = np.concatenate([rows.fr, rows.reg])
    mine = sampler.rank_rows(0, 0)
    assert np.array_equal(global_step[sampler.rank_positions()], np.concatenate([mine.fr, mine.reg]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fr": 3, "world_size": 2}, r"data\.fr_batch: 3 is not divisible by the world size 2"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"seed": -1}, "seed"),
        ({"num_images": 10}, "cannot fill"),
    ],
)
def test_bad_sampler_arguments_are_refused(kwargs: dict, message: str) -> None:
    args = {"num_images": 100, "fr": 8, "reg": 8} | kwargs
    with pytest.raises(ValueError, match=message):  # the layout's ConfigError is a ValueError
        sampler_of(**args)


def draw(cfg: AugmentConfig, *, step: int = 0, fr: int = 64, reg: int = 4000, seed: int = 0):
    layout = BatchLayout(fr, reg, num_images=fr + reg)
    return step_params(cfg, SIZE, seed=seed, epoch=0, step=step, layout=layout)


def test_degradation_frequencies_lie_within_binomial_bounds_and_are_zero_in_the_fr_rows() -> None:
    cfg = AugmentConfig(p_rescale=0.3, p_erase=0.2, p_color=0.5)
    params = draw(cfg)
    assert not params.flags[:64].any()
    reg = params.flags[64:]
    for column, p in enumerate((0.3, 0.2, 0.5)):
        low, high = binomial_bounds(len(reg), p)
        assert low <= reg[:, column].sum() <= high, DEGRADATIONS[column]
    # independence: both rescale and erase about p_rescale · p_erase
    low, high = binomial_bounds(len(reg), 0.3 * 0.2)
    assert low <= (reg[:, 0] & reg[:, 1]).sum() <= high
    low, high = binomial_bounds(len(params), 0.5)
    assert low <= params.flip.sum() <= high


def test_probability_zero_and_one_and_no_flip() -> None:
    none = draw(AugmentConfig(p_rescale=0.0, p_erase=0.0, p_color=0.0))
    assert not none.flags.any()
    every = draw(AugmentConfig(p_rescale=1.0, p_erase=1.0, p_color=1.0))
    assert not every.flags[:64].any() and every.flags[64:].all()
    assert not draw(AugmentConfig(flip=False)).flip.any()


def test_parameters_respect_the_configured_ranges() -> None:
    cfg = AugmentConfig()
    params = draw(cfg)
    side = params.rescale_size[:, 0]
    assert np.array_equal(side, params.rescale_size[:, 1])
    assert side.min() >= round(cfg.rescale_min * SIZE) and side.max() <= round(cfg.rescale_max * SIZE)
    h, w = params.erase_shape[:, 0], params.erase_shape[:, 1]
    y, x = params.erase_anchor[:, 0], params.erase_anchor[:, 1]
    assert (h >= 1).all() and (w >= 1).all() and (y >= 0).all() and (x >= 0).all()
    assert (y + h <= SIZE).all() and (x + w <= SIZE).all()
    area = h * w / SIZE**2
    # rounding of h and w moves the area a little; clipping to the image can only shrink it
    assert area.min() >= cfg.erase_area_min * 0.8 and area.max() <= cfg.erase_area_max * 1.2
    assert np.all(
        np.abs(params.color - 1.0) <= np.array([cfg.brightness, cfg.contrast, cfg.saturation]) + 1e-6
    )
    assert (params.erase_anchor == np.floor(params.erase_anchor)).all()


def test_same_seed_same_plan_and_probabilities_do_not_shift_the_other_draws() -> None:
    cfg = AugmentConfig()
    a, b = draw(cfg, step=5), draw(cfg, step=5)
    for field in dataclasses.fields(a):
        assert np.array_equal(getattr(a, field.name), getattr(b, field.name))
    assert not np.array_equal(a.flip, draw(cfg, step=6).flip)
    assert not np.array_equal(a.flip, draw(cfg, step=5, seed=1).flip)
    other_p = draw(dataclasses.replace(cfg, p_erase=0.9), step=5)
    assert np.array_equal(other_p.flip, a.flip) and np.array_equal(other_p.rescale_size, a.rescale_size)
    assert np.array_equal(other_p.flags[:, 0], a.flags[:, 0])


def test_describe_names_what_a_sample_received() -> None:
    params = draw(AugmentConfig(p_rescale=1.0, p_erase=0.0, p_color=0.0), fr=1, reg=1)
    assert params.describe(0).endswith("clean")
    assert "rescale" in params.describe(1) and "erase" not in params.describe(1)
