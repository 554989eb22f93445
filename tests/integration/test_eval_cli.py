"""`igfiqa erc` (and, further down, eval / score / export) through the real command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from jobs.cli import main


def _write_inputs(directory, num_pairs: int = 400, seed: int = 0):
    """Synthetic pairs whose FNMR falls with quality, and two methods: `oracle` (the true quality) and `noise`."""
    rng = np.random.default_rng(seed)
    images = [f"img{i:05d}" for i in range(2 * num_pairs)]
    quality = rng.random(2 * num_pairs)
    left, right = np.arange(0, 2 * num_pairs, 2), np.arange(1, 2 * num_pairs, 2)
    mated = np.arange(num_pairs) % 2 == 0
    pair_quality = np.minimum(quality[left], quality[right])
    similarity = np.where(
        mated, 0.1 + 0.7 * pair_quality + rng.normal(0, 0.1, num_pairs), rng.normal(0, 0.1, num_pairs)
    )
    pairs = pd.DataFrame(
        {
            "left": [images[i] for i in left],
            "right": [images[i] for i in right],
            "similarity": similarity,
            "mated": mated.astype(int),
        }
    )
    scores = pd.DataFrame({"image": images, "oracle": quality, "noise": rng.random(2 * num_pairs)})
    pairs_path, scores_path = directory / "lfw_pairs.csv", directory / "scores.parquet"
    pairs.to_csv(pairs_path, index=False)
    scores.to_parquet(scores_path)
    return pairs_path, scores_path, pairs, scores


def test_erc_command_writes_the_report(tmp_path, capsys):
    pairs_path, scores_path, _, _ = _write_inputs(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "erc",
            "--pairs",
            str(pairs_path),
            "--scores",
            str(scores_path),
            "--out",
            str(out),
            "--fmr",
            "1e-2",
            "1e-3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"table: {out / 'table.md'}" in printed and "quality_lfw_pairs.png" in printed
    doc = json.loads((out / "results.json").read_text())
    results = {(r["method"], r["fmr"]): r for r in doc["datasets"][0]["results"]}
    # the true quality must beat noise under both metrics and at both FMRs
    for fmr in (1e-2, 1e-3):
        assert results["oracle", fmr]["erc_auc"] < results["noise", fmr]["erc_auc"]
        assert results["oracle", fmr]["edc_pauc"] < results["noise", fmr]["edc_pauc"]
    # 200 non-mated pairs: FMR 1e-3 is below their resolution → a warning, FMR 1e-2 is not
    assert any("FMR 0.001 is below the resolution 1/200" in w for w in doc["warnings"])
    assert not any("FMR 0.01 " in w for w in doc["warnings"])
    assert (out / "quality_lfw_pairs.png").stat().st_size > 10_000
    table = pd.read_csv(out / "table_erc_auc.csv", index_col=0)
    assert list(table.columns) == ["lfw_pairs FMR=1e-2", "lfw_pairs FMR=1e-3"]


def test_erc_command_options(tmp_path):
    pairs_path, scores_path, _, _ = _write_inputs(tmp_path)
    out = tmp_path / "out"
    args = ["erc", "--pairs", str(pairs_path), "--scores", str(scores_path), "--out", str(out)]
    args += [
        "--name",
        "LFW",
        "--methods",
        "oracle",
        "--crfiqa-refit",
        "--discard-limit",
        "0.3",
        "--fmr",
        "0.05",
    ]
    assert main(args) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["method"].tolist() == ["oracle"] and summary["dataset"].tolist() == ["LFW"]
    assert summary["discard_limit"].tolist() == [0.3]
    assert np.isfinite(summary["erc_auc_crfiqa_refit"]).all()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("unscored", "image(s) used by the pairs have no score"),
        ("nan", "is NaN for 1 image(s)"),
        ("single_class", "all 200 pairs are mated"),
        ("bad_fmr", "must lie strictly between 0 and 1"),
    ],
)
def test_erc_command_bad_input_is_one_clear_line(tmp_path, capsys, damage, message):
    pairs_path, scores_path, pairs, scores = _write_inputs(tmp_path)
    fmr = ["--fmr", "1e-2"]
    if damage == "unscored":
        scores.iloc[3:].to_parquet(scores_path)
    elif damage == "nan":
        scores.loc[5, "oracle"] = np.nan
        scores.to_parquet(scores_path)
    elif damage == "single_class":
        pairs[pairs.mated == 1].to_csv(pairs_path, index=False)
    elif damage == "bad_fmr":
        fmr = ["--fmr", "0"]
    code = main(
        ["erc", "--pairs", str(pairs_path), "--scores", str(scores_path), "--out", str(tmp_path / "o"), *fmr]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("igfiqa: error: ")
    assert "Traceback" not in err


def test_erc_command_nan_quality_lowest_warns(tmp_path):
    pairs_path, scores_path, _, scores = _write_inputs(tmp_path)
    scores.loc[5, "oracle"] = np.nan
    scores.to_parquet(scores_path)
    out = tmp_path / "out"
    args = [
        "erc",
        "--pairs",
        str(pairs_path),
        "--scores",
        str(scores_path),
        "--out",
        str(out),
        "--fmr",
        "1e-2",
    ]
    assert main([*args, "--nan-quality", "lowest"]) == 0
    assert "treated as the lowest quality" in (out / "table.md").read_text()


def test_erc_command_missing_file(tmp_path, capsys):
    assert (
        main(["erc", "--pairs", str(tmp_path / "nope.csv"), "--scores", "x.csv", "--out", str(tmp_path)]) == 2
    )
    assert "nope.csv: no such file" in capsys.readouterr().err
