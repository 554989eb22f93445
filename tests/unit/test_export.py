"""ONNX export of backbone + head: parity with torch under onnxruntime, dynamic batch, both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from pipeline.evaluation.export import check_parity, export_onnx
from tests.eval_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.ckpt")[1]


@pytest.fixture(scope="module")
def dynamo_onnx(model, tmp_path_factory):
    """The default exporter's file, with the embedding output (exported once: ~4 s)."""
    path = tmp_path_factory.mktemp("onnx") / "q.onnx"
    assert export_onnx(model, path, with_embedding=True) == "dynamo"
    return path


def test_dynamo_export_with_embedding_matches_torch(model, dynamo_onnx):
    path = dynamo_onnx
    assert not path.with_name("q.onnx.data").exists()  # weights inside the one file
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["images"]
    assert [o.name for o in graph.graph.output] == ["quality", "embedding"]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    report = check_parity(path, model, batch_sizes=(1, 3, 8), exporter="dynamo")
    assert report.batch_sizes == (1, 3, 8)
    assert report.max_abs_diff_quality < 1e-4 and report.max_abs_diff_embedding < 1e-4
    assert report.passed(1e-4)


def test_torchscript_export_quality_only(model, tmp_path):
    path = tmp_path / "q.onnx"
    assert export_onnx(model, path, exporter="torchscript") == "torchscript"
    report = check_parity(path, model, batch_sizes=(2, 5))
    assert report.max_abs_diff_embedding is None and report.max_abs_diff_quality < 1e-4
    assert not model.training  # the exporter must leave the model in eval mode


def test_parity_detects_a_different_model(dynamo_onnx, tmp_path):
    other = make_checkpoint(tmp_path / "other.ckpt", seed=1)[1]
    report = check_parity(dynamo_onnx, other)
    assert report.max_abs_diff_quality > 1e-3 and not report.passed(1e-3)


def test_parity_on_given_images(model, dynamo_onnx):
    images = np.random.default_rng(3).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    report = check_parity(dynamo_onnx, model, images=images)
    assert report.batch_sizes == (4,)
    with torch.no_grad():
        _, quality = model(torch.from_numpy(images))
    assert np.isfinite(quality.numpy()).all() and report.max_abs_diff_quality < 1e-4


def test_nan_outputs_never_pass_parity() -> None:
    from pipeline.evaluation.export import max_abs_diff

    ones = np.ones(3, dtype=np.float32)
    assert max_abs_diff(ones, ones) == 0.0
    assert max_abs_diff(np.full(3, np.nan, dtype=np.float32), np.full(3, np.nan, dtype=np.float32)) == np.inf
    assert max_abs_diff(ones, np.array([1, np.inf, 1], dtype=np.float32)) == np.inf


def test_checked_export_publishes_only_what_passed(model, tmp_path):
    import copy

    from pipeline.evaluation.export import ExportError, export_checked

    path = tmp_path / "q.onnx"
    report = export_checked(model, path, tolerance=1e-3)
    assert path.is_file() and report.passed(1e-3)
    before = path.read_bytes()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in broken.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ExportError, match="NaN or infinite values"):
        export_checked(broken, path)
    assert path.read_bytes() == before  # the good file stays
    with pytest.raises(ExportError, match=r"above the tolerance -1\.0: nothing written"):
        export_checked(model, tmp_path / "strict.onnx", tolerance=-1.0)
    assert not (tmp_path / "strict.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # no temp files left
