"""EvalOptions: one object per evaluation, built from the command's flags with one set of defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import build_parser
from jobs.commands.evaluate import eval_options
from pipeline.config import ConfigError
from pipeline.evaluation.efficacy import EFFICACY_OPTIONS, efficacy_fmr
from pipeline.evaluation.options import EvalOptions


def _options(*argv: str) -> EvalOptions:
    return eval_options(build_parser().parse_args(list(argv)))


def test_bare_command_lines_give_the_default_options():
    # the CLI's defaults are EvalOptions' defaults: one place, flip off
    assert _options("eval", "c.ckpt", "--data", "d", "--out", "o") == EvalOptions()
    assert _options("score", "c.ckpt", "x.jpg", "--out", "s.csv") == EvalOptions()
    assert _options("erc", "--pairs", "p.csv", "--scores", "s.csv", "--out", "o") == EvalOptions()
    assert EvalOptions().flip is False and EFFICACY_OPTIONS.flip is False


def test_every_eval_flag_reaches_its_field():
    options = _options(
        "eval", "c.ckpt", "--data", "d", "--out", "o", "--flip", "--batch-size", "7", "--device", "cpu",
        "--fmr", "0.1", "0.01", "--discard-limit", "0.3", "--crfiqa-refit", "--nan-quality", "lowest",
        "--fr-model", "fr.onnx", "--fr-model", "m/b.onnx", "--fr-bgr", "--own-backbone", "--no-progress",
        "--nonmated-cap", "5000", "--nonmated-seed", "3", "--ground-truth", "gt.parquet",
    )  # fmt: skip
    assert options == EvalOptions(
        flip=True,
        batch_size=7,
        device="cpu",
        fmrs=(0.1, 0.01),
        discard_limit=0.3,
        crfiqa_refit=True,
        nan_policy="lowest",
        fr_models=(Path("fr.onnx"), Path("m/b.onnx")),
        fr_bgr=True,
        own_backbone=True,
        nonmated_sample_cap=5000,
        nonmated_sample_seed=3,
        ground_truth=Path("gt.parquet"),
        progress=False,
    )
    assert options.matcher == "onnx" and options.matcher_names == ("fr", "b", "own backbone")
    assert (
        _options("eval", "c.ckpt", "--data", "d", "--out", "o", "--fr-embeddings", "e.npz").matcher == "npz"
    )
    assert EvalOptions().matcher == "own backbone" and EvalOptions().matcher_names == ("own backbone",)
    assert EvalOptions(fr_embeddings=Path("x/ref.npz")).matcher_names == ("ref",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "batch size 0 must be at least 1"),
        ({"permutations": 0}, "0 random permutations"),
        ({"nan_policy": "ignore"}, "NaN quality policy 'ignore'"),
        ({"fr_models": (Path("a.onnx"),), "fr_embeddings": Path("e.npz")}, "not both"),
        ({"fr_models": (Path("a/m.onnx"), Path("b/m.onnx"))}, "a/m.onnx, b/m.onnx share a file stem"),
        ({"nonmated_sample_cap": -1}, "cap -1 must be at least 0"),
    ],
)
def test_bad_options_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        EvalOptions(**fields)


def test_fmrs_are_kept_as_a_tuple_and_the_efficacy_takes_exactly_one():
    assert EvalOptions(fmrs=[0.1]).fmrs == (0.1,)
    assert efficacy_fmr(EFFICACY_OPTIONS) == 1e-2
    with pytest.raises(ValueError, match="one FMR"):
        efficacy_fmr(EvalOptions())
