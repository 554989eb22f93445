"""Cross-model embeddings: the documented .npz format and an ONNX FR model run with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluation.embeddings import (
    EmbeddingTable,
    OnnxEmbedder,
    load_embeddings_npz,
    save_embeddings_npz,
)
from pipeline.evaluation.verification import EmbeddingError


def test_npz_round_trip_and_lookup_with_set_prefix(tmp_path):
    keys = ["lfw/00000", "lfw/00001", "00002"]
    matrix = np.arange(9, dtype=np.float32).reshape(3, 3)
    path = save_embeddings_npz(tmp_path / "e.npz", keys, matrix)
    table = load_embeddings_npz(path)
    assert len(table) == 3 and table.embeddings.shape == (3, 3)
    # "<set>/<key>" first, then the bare key
    np.testing.assert_array_equal(table.lookup(["00001", "00000", "00002"], prefix="lfw"), matrix[[1, 0, 2]])
    with pytest.raises(EmbeddingError, match=r"no embedding for 1 of 2 images, e.g. \['cfp/00000'\]"):
        table.lookup(["00002", "00000"], prefix="cfp")


def test_npz_written_by_plain_numpy_is_read(tmp_path):
    np.savez(tmp_path / "plain.npz", keys=np.array(["a", "b"]), embeddings=np.ones((2, 4)))
    table = load_embeddings_npz(tmp_path / "plain.npz")
    assert table.embeddings.dtype == np.float32 and table.embeddings.shape == (2, 4)
    np.testing.assert_array_equal(table.lookup(["b"]), np.ones((1, 4)))


def test_bad_npz_files_are_clear_errors(tmp_path):
    np.savez(tmp_path / "wrong.npz", names=np.array(["a"]), vectors=np.ones((1, 2)))
    with pytest.raises(EmbeddingError, match="missing array\\(s\\) keys, embeddings"):
        load_embeddings_npz(tmp_path / "wrong.npz")
    np.savez(tmp_path / "short.npz", keys=np.array(["a", "b", "c"]), embeddings=np.ones((2, 4)))
    with pytest.raises(EmbeddingError, match=r"one row per key; got \(2, 4\) for 3 keys"):
        load_embeddings_npz(tmp_path / "short.npz")
    with pytest.raises(EmbeddingError, match="'a' appears more than once"):
        EmbeddingTable(["a", "a"], np.ones((2, 3)))
    with pytest.raises(EmbeddingError, match=r"keys \['b'\] are not finite"):
        EmbeddingTable(["a", "b"], np.array([[1.0, 2.0], [np.nan, 0.0]]))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(EmbeddingError, match=r"not a readable \.npz"):
        load_embeddings_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_embeddings_npz(tmp_path / "absent.npz")


# The legacy exporter (fast, and it can fix the batch size) warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _TinyFR(nn.Module):
    """A fixed 'face recognition' net: per-channel means (R, G, B) → a 3-d embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0, 10.0, 100.0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) * self.scale


def _export(path, *, fixed_batch: int | None):
    example = torch.zeros(fixed_batch or 2, 3, 112, 112)
    dynamic = None if fixed_batch else {"input.1": {0: "n"}, "fc1": {0: "n"}}
    torch.onnx.export(
        _TinyFR(),
        (example,),
        str(path),
        dynamo=False,
        input_names=["input.1"],
        output_names=["fc1"],
        dynamic_axes=dynamic,
    )
    return path


def _images(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(n, 3, 112, 112)).astype(np.float32)


def test_onnx_embedder_dynamic_batch(tmp_path):
    embedder = OnnxEmbedder(_export(tmp_path / "fr.onnx", fixed_batch=None))
    images = _images(5)
    expected = _TinyFR()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(embedder.embed(images), expected, rtol=1e-5, atol=1e-5)


def test_onnx_embedder_fixed_batch_runs_in_padded_chunks(tmp_path):
    embedder = OnnxEmbedder(_export(tmp_path / "fr2.onnx", fixed_batch=2))
    assert embedder.fixed_batch == 2
    images = _images(5)  # chunks of 2, 2, 1 (+1 zero image, dropped)
    expected = _TinyFR()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(embedder.embed(images), expected, rtol=1e-5, atol=1e-5)


def test_onnx_embedder_bgr_reverses_channels(tmp_path):
    embedder = OnnxEmbedder(_export(tmp_path / "fr.onnx", fixed_batch=None), channel_order="bgr")
    images = _images(2)
    expected = _TinyFR()(torch.from_numpy(images[:, ::-1].copy())).numpy()
    np.testing.assert_allclose(embedder.embed(images), expected, rtol=1e-5, atol=1e-5)


def test_onnx_embedder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        OnnxEmbedder(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(EmbeddingError, match="onnxruntime cannot load it"):
        OnnxEmbedder(tmp_path / "junk.onnx")
    path = _export(tmp_path / "fr.onnx", fixed_batch=None)
    with pytest.raises(EmbeddingError, match="no output 'emb'"):
        OnnxEmbedder(path, output="emb")
    with pytest.raises(EmbeddingError, match="expects 112×112 images, got 96×96"):
        OnnxEmbedder(path).embed(np.zeros((1, 3, 96, 96), np.float32))
