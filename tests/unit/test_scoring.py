"""Image decoding to the contract's layout and batched scoring with unreadable files reported."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.image_io import ImageDecodeError, decode_image, find_image_files, read_image_file
from pipeline.evaluation.mirror import mirror, with_mirror
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.scoring import infer_batch, score_files
from tests.eval_fixtures import face_image, jpeg_bytes, make_checkpoint


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_gives_rgb_chw_float_in_minus_one_one():
    rgb = np.zeros((112, 112, 3), np.uint8)
    rgb[0, 0] = (255, 0, 127)
    rgb[5, 7] = (10, 20, 30)
    decoded = decode_image(_png(rgb), source="mem")
    assert decoded.tensor.dtype == np.float32 and decoded.tensor.shape == (3, 112, 112)
    np.testing.assert_allclose(decoded.tensor[:, 0, 0], [1.0, -1.0, (127 - 127.5) / 127.5])
    np.testing.assert_allclose(decoded.tensor[:, 5, 7], (np.array([10, 20, 30]) - 127.5) / 127.5)
    assert not decoded.resized


def test_grayscale_and_other_sizes_are_converted_and_flagged():
    gray = np.full((100, 90), 200, np.uint8)
    decoded = decode_image(_png(gray), source="mem")
    assert decoded.tensor.shape == (3, 112, 112) and decoded.resized and decoded.original_size == (100, 90)
    np.testing.assert_allclose(decoded.tensor, (200 - 127.5) / 127.5)


def test_unreadable_bytes_name_their_source(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"photo\.jpg: not a readable image"):
        decode_image(b"not an image", source="photo.jpg")
    with pytest.raises(ImageDecodeError, match=r"missing\.png: cannot read the file"):
        read_image_file(tmp_path / "missing.png")


def test_find_image_files_recurses_and_keeps_explicit_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.PNG", "a/b/z.jpeg", "a/notes.txt", "explicit.bmp"):
        (tmp_path / name).write_bytes(b"")
    found = find_image_files([tmp_path / "a", tmp_path / "explicit.bmp"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/b/y.PNG",
        "a/b/z.jpeg",
        "a/x.jpg",
        "explicit.bmp",
    ]
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        find_image_files([tmp_path / "nope"])


def test_score_files_reports_broken_files_and_goes_on(tmp_path):
    _, model = make_checkpoint(tmp_path / "m.ckpt")
    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    good = {
        folder / "a.jpg": face_image(1),
        folder / "sub" / "b.png": face_image(2),
        folder / "c.jpg": face_image(3),
    }
    for path, image in good.items():
        image.save(path)
    (folder / "broken.jpg").write_bytes(jpeg_bytes(face_image(4))[:300])  # truncated JPEG
    (folder / "text.png").write_text("hello")
    files = find_image_files([folder])
    scored = score_files(model, files, EvalOptions(device="cpu", batch_size=2, progress=False))

    table = scored.table.set_index("image")
    assert len(table) == 5 and len(scored.failed) == 2
    for broken in ("broken.jpg", "text.png"):
        row = table.loc[str(folder / broken)]
        assert np.isnan(row["quality"]) and f"{broken}: not a readable image" in row["error"]
    # the scores are the model's own outputs on the decoded tensors
    readable = [p for p in files if p in good]
    tensors = np.stack([read_image_file(p).tensor for p in readable])
    expected = infer_batch(model, tensors, torch.device("cpu"))
    np.testing.assert_allclose(
        table.loc[[str(p) for p in readable], "quality"], expected.quality, rtol=1e-5, atol=1e-6
    )
    # batches of 2 vs 3 take different oneDNN kernels: float32 rounding of values up to ~15 in size
    np.testing.assert_allclose(scored.embeddings, expected.embeddings, rtol=1e-5, atol=1e-4)
    assert table["height"].loc[str(folder / "a.jpg")] == 112 and not table["resized"].any()


def test_flip_adds_the_mirror_embedding_and_averages_the_quality(tmp_path):
    _, model = make_checkpoint(tmp_path / "m.ckpt")
    images = np.stack([decode_image(jpeg_bytes(face_image(i)), source="x").tensor for i in range(3)])
    plain = infer_batch(model, images, torch.device("cpu"))
    mirrored = infer_batch(model, np.ascontiguousarray(images[..., ::-1]), torch.device("cpu"))
    flipped = infer_batch(model, images, torch.device("cpu"), flip=True)
    np.testing.assert_allclose(
        flipped.embeddings, plain.embeddings + mirrored.embeddings, rtol=1e-5, atol=1e-5
    )
    # the faces are not mirror-symmetric, so the mirror images' quality differs and the mean shows
    assert np.abs(plain.quality - mirrored.quality).max() > 1e-4
    np.testing.assert_allclose(flipped.quality, (plain.quality + mirrored.quality) / 2, rtol=1e-5, atol=1e-6)


def test_mirror_reverses_the_width_axis_of_numpy_and_torch_batches():
    images = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    mirrored = mirror(images)
    assert mirrored.flags.c_contiguous
    np.testing.assert_array_equal(mirrored[1, 2, 0], images[1, 2, 0, ::-1])
    np.testing.assert_array_equal(mirror(torch.from_numpy(images)).numpy(), mirrored)


def test_with_mirror_sums_embeddings_averages_quality_and_runs_once_without_flip():
    calls = []

    def forward(batch):  # embedding: the first pixel row; quality: its first pixel
        calls.append(batch)
        return batch[:, 0, 0, :], batch[:, 0, 0, 0]

    images = np.zeros((1, 1, 1, 3), np.float32)
    images[0, 0, 0] = [1.0, 2.0, 7.0]
    embeddings, quality = with_mirror(forward, images, flip=False)
    assert len(calls) == 1 and quality.tolist() == [1.0]
    embeddings, quality = with_mirror(forward, images, flip=True)
    np.testing.assert_array_equal(embeddings, [[8.0, 4.0, 8.0]])  # [1, 2, 7] + [7, 2, 1]
    assert quality.tolist() == [4.0]  # (1 + 7) / 2
    # a matcher without a quality output (an ONNX FR model)
    embeddings, quality = with_mirror(lambda b: (b[:, 0, 0, :], None), images, flip=True)
    assert quality is None and embeddings.tolist() == [[8.0, 4.0, 8.0]]


@pytest.mark.gpu
def test_scoring_on_cuda_matches_cpu(tmp_path, no_tf32):
    _, model = make_checkpoint(tmp_path / "m.ckpt")
    images = np.stack([decode_image(jpeg_bytes(face_image(i)), source="x").tensor for i in range(4)])
    on_cpu = infer_batch(model, images, torch.device("cpu"), flip=True)
    on_gpu = infer_batch(model.to("cuda"), images, torch.device("cuda"), flip=True)
    np.testing.assert_allclose(on_gpu.quality, on_cpu.quality, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(on_gpu.embeddings, on_cpu.embeddings, rtol=1e-3, atol=1e-3)
