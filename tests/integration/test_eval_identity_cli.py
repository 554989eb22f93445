"""`igfiqa eval` on an identity-labelled converted set: all-vs-all comparisons by two ONNX matchers,
quality from one forward pass, the oracle from ground truth; equal to a brute-force pairs table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkpoint, two ONNX FR models (`igfiqa export --with-embedding`), an identity-labelled set
    (12 identities × 4 images, converted from RecordIO) with its ground truth, and a verification set."""
    from tests.eval_fixtures import make_checkpoint, make_identity_set, make_verification_set

    root = tmp_path_factory.mktemp("idset")
    checkpoint, model = make_checkpoint(root / "tiny.ckpt", global_step=9)
    matchers = []
    for name, seed in (("arc", 5), ("curricular", 6)):
        fr_checkpoint, _ = make_checkpoint(root / f"{name}.ckpt", seed=seed)
        onnx = root / f"{name}.onnx"
        export = ["export", str(fr_checkpoint), "--onnx", str(onnx), "--with-embedding"]
        assert main([*export, "--exporter", "torchscript"]) == 0
        matchers.append(onnx)
    dataset, truth = make_identity_set(root)
    make_verification_set(root / "idsets", "lfw", seed=2)
    return root, checkpoint, model, matchers, dataset, truth


def _images_in_source_order(dataset):
    """(manifest sorted by record, [N, 3, 112, 112]) decoded from the shards."""
    from pipeline.data.image_io import decode_image

    manifest = pd.read_parquet(dataset / "manifest.parquet").sort_values("record").reset_index(drop=True)
    tars = {}
    tensors = []
    for shard, offset, nbytes in zip(manifest.shard, manifest.offset, manifest.nbytes, strict=True):
        if shard not in tars:
            tars[shard] = (dataset / "shards" / f"shard-{shard:05d}.tar").read_bytes()
        tensors.append(decode_image(tars[shard][offset : offset + nbytes], source="test").tensor)
    return manifest, np.stack(tensors)


def _brute_force_pairs(manifest, embeddings) -> pd.DataFrame:
    """Every pair i < j of the images in source order, row-major, with its cosine; images are named
    by their number ("00007"), so that the pairs path numbers them in the same order (its random
    reference draws one quality per image in name order)."""
    unit = embeddings.astype(np.float64) / np.linalg.norm(
        embeddings.astype(np.float64), axis=1, keepdims=True
    )
    i, j = np.triu_indices(len(manifest), 1)
    return pd.DataFrame(
        {
            "left": [f"{k:05d}" for k in i],
            "right": [f"{k:05d}" for k in j],
            "similarity": np.einsum("kd,kd->k", unit[i], unit[j]),
            "mated": (manifest.label.to_numpy()[i] == manifest.label.to_numpy()[j]).astype(int),
        }
    )


def test_eval_all_vs_all_by_two_onnx_matchers_equals_a_brute_force_table(workspace, tmp_path):
    from pipeline.evaluation.embeddings import OnnxEmbedder
    from pipeline.evaluation.quality_metrics import evaluate_quality
    from pipeline.evaluation.scoring import infer_batch

    _, checkpoint, model, matchers, dataset, truth = workspace
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--data", str(dataset), "--out", str(out), "--ground-truth", str(truth)]
    args += ["--fr-model", str(matchers[0]), "--fr-model", str(matchers[1])]
    assert main([*args, "--batch-size", "16", "--no-track", "--no-progress"]) == 0

    summary = pd.read_csv(out / "summary.csv")
    # 48 images: 1,128 pairs, 72 mated, 1,056 non-mated → FMR 1e-2 is the one resolved
    assert set(summary["matcher"]) == {"arc", "curricular"} and set(summary["fmr"]) == {0.01}
    assert sorted(summary["method"].unique()) == ["oracle", "random", "tiny"]
    table = pd.read_csv(out / "table_edc_pauc.csv", index_col=0)
    assert list(table.columns) == ["idset (arc) FMR=1e-2", "idset (curricular) FMR=1e-2"]
    assert list(table.index) == ["tiny", "oracle", "random"]
    doc = json.loads((out / "results.json").read_text())
    entry = doc["datasets"][0]
    assert entry["matcher"] == "arc" and (entry["num_pairs"], entry["num_mated"]) == (1128, 72)
    assert entry["pair_set"]["identities"] == 12 and entry["pair_set"]["nonmated_sampled"] is False
    assert doc["metadata"]["matchers"] == ["arc", "curricular"]
    assert "Comparisons by: arc, curricular." in (out / "table.md").read_text()
    assert (out / "quality_idset_arc.png").is_file() and (out / "quality_idset_curricular.png").is_file()

    # quality: one forward pass of the checkpoint's model; oracle: −strength of the ground truth
    manifest, images = _images_in_source_order(dataset)
    scores = pd.read_parquet(out / "scores_idset.parquet")
    assert scores["image"].tolist() == manifest.key.tolist()
    expected = infer_batch(model, images, torch.device("cpu")).quality
    np.testing.assert_allclose(scores["tiny"], expected, rtol=1e-5, atol=1e-6)
    strength = pd.read_parquet(truth).set_index("record").loc[manifest.record, "strength"]
    np.testing.assert_allclose(scores["oracle"], -strength.to_numpy())

    # the oracle ranks the failing (degraded) pairs first: its ERC lies below random by either matcher
    assert (summary[summary.method == "oracle"]["erc_auc_vs_random"] < 0.8).all()
    # every figure equals the pairs path on the full pairs table, for each matcher
    for onnx in matchers:
        embedder = OnnxEmbedder(onnx)
        embeddings = np.concatenate([embedder.embed(images[k : k + 16]) for k in range(0, len(images), 16)])
        numbered = scores.drop(columns="label").assign(image=[f"{k:05d}" for k in range(len(scores))])
        brute = evaluate_quality(
            _brute_force_pairs(manifest, embeddings), numbered, dataset="idset", fmrs=[0.01]
        )
        ours = summary[summary.matcher == onnx.stem].set_index("method")
        for result in brute.results:
            row = ours.loc[result.method]
            assert row["threshold"] == pytest.approx(result.threshold.value, abs=1e-6)
            assert row["edc_pauc"] == pytest.approx(result.edc_pauc, abs=1e-12)
            assert row["erc_auc"] == pytest.approx(result.erc.auc, abs=1e-12)


def test_eval_identity_and_verification_sets_with_a_sample_and_the_own_backbone(workspace, tmp_path):
    _, checkpoint, _, matchers, dataset, truth = workspace
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--data", str(dataset.parent), "--out", str(out), "--no-progress"]
    args += [
        "--fr-model",
        str(matchers[0]),
        "--own-backbone",
        "--nonmated-cap",
        "300",
        "--nonmated-seed",
        "4",
    ]
    assert main([*args, "--ground-truth", str(truth), "--no-track", "--fmr", "0.1"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert set(zip(summary.dataset, summary.matcher, strict=True)) == {
        (name, matcher) for name in ("idset", "lfw") for matcher in ("arc", "own backbone")
    }
    idset = json.loads((out / "results.json").read_text())["datasets"]
    sampled = next(d for d in idset if d["dataset"] == "idset" and d["matcher"] == "arc")["pair_set"]
    assert sampled["nonmated_sampled"] and sampled["nonmated_sample_seed"] == 4
    assert abs(sampled["nonmated_evaluated"] - 300) < 4 * 300**0.5 and sampled["nonmated_total"] == 1056
    assert "a hashed sample of" in (out / "table.md").read_text()
    verification = pd.read_csv(out / "verification.csv")
    assert sorted(verification["dataset"]) == ["lfw (arc)", "lfw (own backbone)"]
    assert (out / "pairs_lfw.arc.parquet").is_file() and (out / "pairs_lfw.own_backbone.parquet").is_file()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_rows", "24 of 48 images of idset have no finite strength (matched by record)"),
        ("no_key", "a ground truth needs a strength column and one of key, record"),
    ],
)
def test_eval_bad_ground_truth_is_one_clear_line(workspace, tmp_path, capsys, case, message):
    _, checkpoint, _, _, dataset, truth = workspace
    table = pd.read_parquet(truth)
    bad = tmp_path / "truth.csv"
    (table.iloc[::2] if case == "missing_rows" else table.drop(columns="record")).to_csv(bad, index=False)
    args = ["eval", str(checkpoint), "--data", str(dataset), "--out", str(tmp_path / "o"), "--no-track"]
    assert main([*args, "--ground-truth", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
