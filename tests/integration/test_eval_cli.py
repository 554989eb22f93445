"""`igfiqa erc` (and, further down, eval / score / export) through the real command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

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
    # 200 non-mated pairs: FMR 1e-3 is below their resolution, FMR 1e-2 rests on 2 false matches
    assert any("FMR 0.001 is below the resolution 1/200" in w for w in doc["warnings"])
    assert any("FMR 0.01 rests on 2.0 false matches of 200" in w for w in doc["warnings"])
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
    assert summary["method"].tolist() == ["oracle", "random"] and summary["dataset"].tolist() == ["LFW"] * 2
    assert summary["discard_limit"].tolist() == [0.3, 0.3]
    oracle = summary[summary.method == "oracle"]
    assert np.isfinite(oracle["erc_auc_crfiqa_refit"]).all()  # the reference has no refit curve


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


# --------------------------------------------------------------------------- eval / score / export


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small checkpoint and two converted verification sets (lfw, cfp) of 20 pairs each."""
    from tests.eval_fixtures import make_checkpoint, make_verification_set

    root = tmp_path_factory.mktemp("eval")
    checkpoint, model = make_checkpoint(root / "tiny.ckpt", global_step=42)
    make_verification_set(root / "val", "lfw", seed=0)
    make_verification_set(root / "val", "cfp", seed=1)
    return root, checkpoint, model


def _set_images(root, name):
    """{key: encoded bytes} of a converted set, read back through the manifest offsets."""
    manifest = pd.read_parquet(root / "val" / name / "manifest.parquet")
    tar = (root / "val" / name / "shards" / "shard-00000.tar").read_bytes()
    return {k: tar[o : o + n] for k, o, n in zip(manifest.key, manifest.offset, manifest.nbytes, strict=True)}


def test_eval_with_own_backbone_agrees_with_score(workspace, tmp_path, capsys):
    root, checkpoint, _ = workspace
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--data", str(root / "val"), "--out", str(out), "--fmr", "0.1", "0.01"]
    assert main([*args, "--no-track", "--no-progress", "--batch-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert "Verification accuracy (10-fold)" in printed and "quality_cfp.png" in printed
    for name in ("table.md", "results.json", "verification.csv", "quality_lfw.png", "quality_cfp.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["embeddings"] == "own backbone" and doc["metadata"]["global_step"] == 42
    assert sorted(d["dataset"] for d in doc["datasets"]) == ["cfp", "lfw"]
    verification = pd.read_csv(out / "verification.csv")
    assert sorted(verification["dataset"]) == ["cfp", "lfw"] and (verification["num_pairs"] == 20).all()
    # FMR 0.01 of 10 non-mated pairs is below resolution: a warning, not a failure
    assert any("FMR 0.01 is below the resolution 1/10" in w for w in doc["warnings"])

    # the quality eval wrote for each image equals what `igfiqa score` gives for the same bytes as files
    scores = pd.read_parquet(out / "scores_lfw.parquet")
    assert list(scores.columns) == ["image", "tiny"] and len(scores) == 40
    files = tmp_path / "files"
    files.mkdir()
    for key, data in _set_images(root, "lfw").items():
        (files / f"{key}.jpg").write_bytes(data)
    assert (
        main(["score", str(checkpoint), str(files), "--out", str(tmp_path / "s.parquet"), "--no-progress"])
        == 0
    )
    scored = pd.read_parquet(tmp_path / "s.parquet")
    scored["key"] = [p.rsplit("/", 1)[-1][:-4] for p in scored["image"]]
    merged = scores.merge(scored, left_on="image", right_on="key")
    assert len(merged) == 40
    np.testing.assert_allclose(merged["tiny"], merged["quality"], rtol=1e-5, atol=1e-6)

    # and `igfiqa erc` on the written pairs/scores reproduces the eval's numbers
    assert (
        main(
            [
                "erc",
                "--pairs",
                str(out / "pairs_lfw.parquet"),
                "--scores",
                str(out / "scores_lfw.parquet"),
                "--out",
                str(tmp_path / "erc"),
                "--fmr",
                "0.1",
                "--name",
                "lfw",
            ]
        )
        == 0
    )
    again = pd.read_csv(tmp_path / "erc" / "summary.csv")
    first = pd.read_csv(out / "summary.csv")
    first = first[(first.dataset == "lfw") & (first.fmr == 0.1)]
    np.testing.assert_allclose(again["erc_auc"], first["erc_auc"])
    np.testing.assert_allclose(again["edc_pauc"], first["edc_pauc"])


def _npz_for(root, tmp_path, *, break_pair0: bool):
    """Embeddings keyed "<set>/<key>": mated pairs identical, non-mated orthogonal (pair 0 broken on request)."""
    from pipeline.evaluation.embeddings import save_embeddings_npz

    keys, rows = [], []
    for name in ("lfw", "cfp"):
        pairs = pd.read_parquet(root / "val" / name / "pairs.parquet")
        for i, (left, right, same) in enumerate(zip(pairs.left, pairs.right, pairs.issame, strict=True)):
            a = np.zeros(64)
            a[i] = 1.0
            b = a.copy() if same and not (break_pair0 and i == 0) else np.roll(a, 32)
            keys += [f"{name}/{left}", f"{name}/{right}"]
            rows += [a * (1 + i), b]
    return save_embeddings_npz(tmp_path / "fr.npz", keys, np.stack(rows))


def test_eval_cross_model_with_precomputed_embeddings(workspace, tmp_path):
    root, checkpoint, _ = workspace
    npz = _npz_for(root, tmp_path, break_pair0=True)
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--data", str(root / "val"), "--out", str(out), "--fmr", "0.1"]
    assert main([*args, "--fr-embeddings", str(npz), "--no-track", "--no-progress", "--name", "ours"]) == 0
    verification = pd.read_csv(out / "verification.csv").set_index("dataset")
    # pair 0 (mated, but orthogonal embeddings) is wrong: fold 0 (pairs 0, 1) scores 1/2, the rest 1 → 0.95
    assert verification.loc["lfw", "accuracy"] == pytest.approx(0.95)
    assert verification.loc["cfp", "accuracy"] == pytest.approx(0.95)
    assert "lfw (own backbone)" in verification.index
    pairs = pd.read_parquet(out / "pairs_lfw.parquet")
    expected = np.where(pairs["mated"] == 1, 1.0, 0.0)
    expected[0] = 0.0
    np.testing.assert_allclose(pairs["similarity"], expected, atol=1e-6)
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["embeddings"] == "npz" and doc["metadata"]["fr_embeddings"] == str(npz)
    assert {r["method"] for d in doc["datasets"] for r in d["results"]} == {"ours", "random"}


def test_eval_cross_model_with_an_onnx_fr_model(workspace, tmp_path):
    from pipeline.evaluation.scoring import infer_batch
    from tests.eval_fixtures import make_checkpoint

    root, checkpoint, _ = workspace
    fr_checkpoint, fr_model = make_checkpoint(tmp_path / "fr.ckpt", seed=5)
    onnx_path = tmp_path / "fr.onnx"
    assert (
        main(
            [
                "export",
                str(fr_checkpoint),
                "--onnx",
                str(onnx_path),
                "--with-embedding",
                "--exporter",
                "torchscript",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--data", str(root / "val"), "--out", str(out), "--fmr", "0.1"]
    assert main([*args, "--fr-model", str(onnx_path), "--no-track", "--no-progress"]) == 0
    # the comparisons used the FR model's embeddings ("embedding" output), not our backbone's
    from pipeline.data.image_io import decode_image
    from pipeline.evaluation.verification import cosine_similarity

    images = _set_images(root, "cfp")
    pairs = pd.read_parquet(out / "pairs_cfp.parquet")
    tensors = {k: decode_image(v, source=k).tensor for k, v in images.items()}
    left = infer_batch(fr_model, np.stack([tensors[k] for k in pairs.left]), torch.device("cpu")).embeddings
    right = infer_batch(fr_model, np.stack([tensors[k] for k in pairs.right]), torch.device("cpu")).embeddings
    np.testing.assert_allclose(pairs["similarity"], cosine_similarity(left, right), atol=1e-4)

    # with --flip the ONNX model's embeddings add the mirror image's, as our model's do in torch
    assert main([*args, "--fr-model", str(onnx_path), "--flip", "--no-track", "--no-progress"]) == 0
    flipped = pd.read_parquet(out / "pairs_cfp.parquet")
    cpu = torch.device("cpu")
    left = infer_batch(fr_model, np.stack([tensors[k] for k in pairs.left]), cpu, flip=True).embeddings
    right = infer_batch(fr_model, np.stack([tensors[k] for k in pairs.right]), cpu, flip=True).embeddings
    np.testing.assert_allclose(flipped["similarity"], cosine_similarity(left, right), atol=1e-4)
    assert np.abs(flipped["similarity"] - pairs["similarity"]).max() > 1e-3  # the mirror images count
    assert json.loads((out / "results.json").read_text())["metadata"]["flip"] is True


def test_eval_logs_to_mlflow_as_a_child_of_the_training_run(workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import RunTracker
    from tests.eval_fixtures import make_checkpoint

    root, _, _ = workspace
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = RunTracker.start(tracking_uri=uri, experiment="igfiqa", run_name="train")
    checkpoint, _ = make_checkpoint(tmp_path / "run.ckpt", run_id=train.run_id, global_step=42)
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--data", str(root / "val" / "lfw"), "--out", str(out), "--fmr", "0.1"]
    assert main([*args, "--tracking-uri", uri, "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("igfiqa")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'eval'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == train.run_id and run.info.status == "FINISHED"
    assert run.data.params["flip"] == "False" and run.data.params["fmr"] == "0.1"
    assert run.data.params["discard_limit"] == "0.2" and run.data.params["fr_model"] == ""
    assert run.data.metrics["lfw.accuracy"] == pytest.approx(
        pd.read_csv(out / "verification.csv")["accuracy"][0]
    )
    history = client.get_metric_history(run.info.run_id, "lfw.tiny.erc_auc.fmr_1e-1")
    assert [m.step for m in history] == [42]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/table.md", "eval/quality_lfw.png", "eval/results.json"} <= artifacts


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_sets", "no converted verification sets here"),
        ("unfinished", "no dataset.json"),
        ("missing_keys", "no embedding for 40 of 40 images"),
        ("bad_checkpoint", "not a readable checkpoint"),
        ("missing_checkpoint", "no such checkpoint file"),
    ],
)
def test_eval_bad_input_is_one_clear_line(workspace, tmp_path, capsys, case, message):
    from pipeline.evaluation.embeddings import save_embeddings_npz

    root, checkpoint, _ = workspace
    data, extra = root / "val", []
    if case == "no_sets":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "unfinished":
        data = tmp_path / "partial"
        (data / "lfw" / "shards").mkdir(parents=True)
    elif case == "missing_keys":
        data = root / "val" / "lfw"
        npz = save_embeddings_npz(tmp_path / "e.npz", ["other/1"], np.ones((1, 8)))
        extra = ["--fr-embeddings", str(npz)]
    elif case == "bad_checkpoint":
        checkpoint = tmp_path / "bad.ckpt"
        checkpoint.write_bytes(b"garbage")
    elif case == "missing_checkpoint":
        checkpoint = tmp_path / "absent.ckpt"
    code = main(
        ["eval", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "o"), "--no-track", *extra]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_score_command_on_a_folder_with_broken_files(workspace, tmp_path, capsys):
    from tests.eval_fixtures import face_image, jpeg_bytes

    _, checkpoint, _ = workspace
    folder = tmp_path / "faces"
    (folder / "deeper").mkdir(parents=True)
    face_image(1).save(folder / "a.jpg")
    face_image(2).resize((120, 100)).save(folder / "deeper" / "b.png")
    (folder / "deeper" / "broken.jpg").write_bytes(jpeg_bytes(face_image(3))[:200])
    out = tmp_path / "scores.csv"
    code = main(
        [
            "score",
            str(checkpoint),
            str(folder),
            "--out",
            str(out),
            "--column",
            "q",
            "--embeddings",
            str(tmp_path / "e.npz"),
            "--no-progress",
            "--batch-size",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "scored 2 of 3 images" in printed and "1 unreadable file(s)" in printed and "broken.jpg" in printed
    assert "1 image(s) were not 112×112" in printed
    table = pd.read_csv(out).set_index("image")
    assert list(table.columns) == ["q", "height", "width", "resized", "error"]
    assert np.isnan(table.loc[str(folder / "deeper" / "broken.jpg"), "q"])
    assert bool(table.loc[str(folder / "deeper" / "b.png"), "resized"])
    assert (table.loc[str(folder / "deeper" / "b.png"), ["height", "width"]] == [100, 120]).all()
    embeddings = np.load(tmp_path / "e.npz")
    assert sorted(embeddings["keys"]) == sorted([str(folder / "a.jpg"), str(folder / "deeper" / "b.png")])
    assert embeddings["embeddings"].shape == (2, 32)


def test_score_command_all_unreadable_fails(workspace, tmp_path):
    _, checkpoint, _ = workspace
    (tmp_path / "x.jpg").write_text("no")
    assert (
        main(["score", str(checkpoint), str(tmp_path / "x.jpg"), "--out", str(tmp_path / "s.parquet")]) == 1
    )


def test_export_command_reports_parity(workspace, tmp_path, capsys):
    import onnxruntime as ort

    _, checkpoint, model = workspace
    onnx_path = tmp_path / "quality.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(onnx_path)]) == 0
    printed = capsys.readouterr().out
    assert "dynamo exporter" in printed and "max |diff| quality" in printed
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).uniform(-1, 1, (6, 3, 112, 112)).astype(np.float32)
    (quality,) = session.run(None, {"images": images})
    with torch.no_grad():
        _, expected = model(torch.from_numpy(images))
    np.testing.assert_allclose(quality, expected.numpy(), atol=1e-4)


def test_eval_and_score_from_an_inference_file_equal_the_checkpoints(workspace, tmp_path):
    """The inference file (model and config only) gives the same scores and evaluation as its checkpoint."""
    from pipeline.checkpoint import build_inference_state, training_lineage

    root, checkpoint, _ = workspace
    infer = tmp_path / "tiny.infer.pt"
    torch.save(build_inference_state(torch.load(checkpoint, weights_only=True)), infer)
    assert training_lineage(infer) == training_lineage(checkpoint)
    files = tmp_path / "files"
    files.mkdir()
    for key, data in list(_set_images(root, "lfw").items())[:12]:
        (files / f"{key}.jpg").write_bytes(data)
    results = {}
    for name, model_file in (("ckpt", checkpoint), ("infer", infer)):
        out = tmp_path / name
        assert (
            main(["score", str(model_file), str(files), "--out", str(out / "s.parquet"), "--no-progress"])
            == 0
        )
        args = ["eval", str(model_file), "--data", str(root / "val"), "--out", str(out), "--fmr", "0.1"]
        assert main([*args, "--no-track", "--no-progress"]) == 0
        doc = json.loads((out / "results.json").read_text())
        results[name] = (pd.read_parquet(out / "s.parquet"), doc["datasets"], doc["metadata"]["global_step"])
    pd.testing.assert_frame_equal(results["infer"][0], results["ckpt"][0])
    assert results["infer"][1] == results["ckpt"][1] and results["infer"][2] == 42
