"""The demo's efficacy stage without a model: the primary set's size and seed checks, and how
`evaluate_run`'s rows become the flat figures, the MLflow names and the summary's table."""

from __future__ import annotations

import re

import pytest

from jobs.errors import UserError
from jobs.stages.efficacy import (
    PrimarySet,
    efficacy_lines,
    primary_figures,
    primary_options,
    primary_rows,
    primary_seed,
)


def test_the_primary_set_counts_its_pairs_and_refuses_what_cannot_resolve_fmr_1e4() -> None:
    default = PrimarySet(seed=primary_seed(0))
    assert default.seed == 3_000_000
    assert (default.mated, default.nonmated) == (13_500, 4_485_000)
    default.check(training_seed=0, other_seeds={"the matchers' training data seed": 2_000_000})
    small = PrimarySet(seed=3_000_000, identities=50, images_per_identity=10)
    assert small.nonmated == 122_500  # 12 false matches at FMR 1e-4: resolved
    small.check(training_seed=0, other_seeds={})
    with pytest.raises(UserError, match="give 19,000 non-mated pairs: FMR 1e-4 needs 100,000"):
        PrimarySet(seed=3_000_000, identities=20, images_per_identity=10).check(
            training_seed=0, other_seeds={}
        )
    with pytest.raises(UserError, match="seed 2000000 is the matchers' training data seed"):
        PrimarySet(seed=2_000_000).check(
            training_seed=0, other_seeds={"the matchers' training data seed": 2_000_000}
        )
    with pytest.raises(UserError, match=r"seed 5 is the training data's seed \(--seed\)"):
        PrimarySet(seed=5).check(training_seed=5, other_seeds={})


def _row(method: str, fmr: float, edc: float, erc: float) -> dict:
    """One row as `jobs.study.measure._quality_rows` writes it."""
    return {
        "set": "unseen",
        "kind": "identity",
        "matcher": "m-1",
        "method": method,
        "fmr": fmr,
        "edc_pauc": edc,
        "random_edc_pauc": 0.1,
        "edc_ratio": edc / 0.1,
        "erc_auc": erc,
        "random_erc_auc": 0.4,
        "erc_ratio": erc / 0.4,
        "fnmr": 0.3,
        "achieved_fmr": fmr * 0.99,
        "below_resolution": False,
        "num_mated": 13_500,
        "num_nonmated": 4_485_000,
    }


def test_rows_become_named_figures_and_the_summary_table(tmp_path) -> None:
    options = primary_options(tmp_path / "m-1.onnx")
    assert options.flip is False and options.fmrs == (1e-3, 1e-4) and options.discard_limit == 0.2
    assert options.matcher_names == ("m-1",)  # the reference matcher only: no own backbone
    rows = [
        _row("model", 1e-3, 0.06, 0.12),
        _row("oracle", 1e-3, 0.05, 0.08),
        _row("model", 1e-4, 0.09, 0.3),
        _row("oracle", 1e-4, 0.08, 0.2),
    ]
    figures = primary_figures(rows, PrimarySet(seed=3_000_000), options)
    assert figures["primary.m-1.edc_ratio_fmr1e-3"] == pytest.approx(0.6)
    assert figures["primary.m-1.oracle_erc_ratio_fmr1e-4"] == pytest.approx(0.5)
    assert figures["primary.m-1.random_edc_pauc_fmr1e-4"] == 0.1 and figures["primary.nonmated"] == 4_485_000
    assert [(r["matcher"], r["fmr"]) for r in primary_rows(figures)] == [("m-1", "1e-3"), ("m-1", "1e-4")]
    secondary = {
        "seed": 1e6,
        "pairs": 2000,
        "flip": 1.0,
        "clean_accuracy": 0.99,
        "mixed_spearman": -0.6,
        "edc_ratio": 0.54,
        "fmr": 0.01,
        "discard_limit": 0.2,
        "permutations": 20,
        "oracle_ratio": 0.52,
    }
    lines = efficacy_lines(figures | {f"secondary.{k}": float(v) for k, v in secondary.items()})
    text = "\n".join(lines)
    assert text.index("PRIMARY efficacy protocol") < text.index("secondary (labelled; not the protocol)")
    assert "matcher m-1, FMR 1e-3" in text and "matcher m-1, FMR 1e-4" in text
    assert re.search(r"^ +/ random +0\.600 +1\.000 +0\.500$", text, re.M)  # model, random, oracle EDC
    assert "13,500 mated and 4,485,000 non-mated pairs" in text


def test_rows_without_the_oracle_are_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="no oracle rows"):
        primary_figures(
            [_row("model", 1e-3, 0.06, 0.12)], PrimarySet(seed=3), primary_options(tmp_path / "m.onnx")
        )
