"""The GPU variant of the DALI graph (decoder "mixed", GPU operators) against the CPU variant.

Skipped with a reason where there is no CUDA GPU (tests/conftest.py); runs where one is lent.
The plan (order, flags, parameters) is numpy, so both variants must agree on keys and
flags exactly; nvJPEG and libjpeg-turbo may differ by a grey level or two, so pixels
are compared with that tolerance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.augment_plan import draw_params
from pipeline.data.dali_graph import GraphBatch, run_graph
from pipeline.data.image_io import decode_image
from pipeline.data.loader import TrainLoader

pytestmark = pytest.mark.gpu

# nvJPEG (GPU) and libjpeg-turbo (CPU) use different IDCT and chroma-upsampling arithmetic: the
# same JPEG decodes to almost the same pixels, but a few pixels at colour edges may lie far apart
# (28 grey levels on an H200), so the bound is on the mean and the 99th percentile.
DECODER_TOLERANCE = {"mean": 0.5, "p99": 3.0}  # grey levels of the 0..255 image
# normalisation rounds differently on the two devices: one float32 ulp of 1.0 is ~1e-5 grey levels
ROUNDING = 1e-4


def assert_decoded_alike(cpu: torch.Tensor, gpu: torch.Tensor) -> None:
    """Two decodings of the same JPEGs (normalised to [-1, 1]) within DECODER_TOLERANCE."""
    levels = ((cpu - gpu.cpu()).abs() * 127.5).double().flatten().numpy()
    measured = {"mean": levels.mean(), "p99": np.percentile(levels, 99), "max": levels.max()}
    assert measured["mean"] <= DECODER_TOLERANCE["mean"], measured
    assert measured["p99"] <= DECODER_TOLERANCE["p99"], measured


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.convert import convert
    from data_prep.synth import synthesize

    root = tmp_path_factory.mktemp("gpu_dataset")
    synthesize(root / "synth", identities=20, images_per_identity=10, seed=0)
    convert(root / "synth", root / "train", samples_per_shard=100, progress=False)
    return root / "train"


def loaders(dataset: Path, augment: AugmentConfig) -> tuple[TrainLoader, TrainLoader]:
    data = DataConfig(dataset=str(dataset), fr_batch=16, reg_batch=16, num_threads=2, augment=augment)
    return TrainLoader(data, device="cpu"), TrainLoader(data, device="cuda")


def test_gpu_variant_matches_cpu_in_shape_range_keys_and_flags(dataset: Path) -> None:
    cpu, gpu = loaders(dataset, AugmentConfig())
    cpu.set_epoch(1)
    gpu.set_epoch(1)
    assert gpu.steps_per_epoch == cpu.steps_per_epoch
    for a, b in zip(cpu, gpu):
        for half_a, half_b in ((a.fr, b.fr), (a.reg, b.reg)):
            assert half_b.images.is_cuda and half_b.labels.is_cuda
            assert half_b.images.shape == half_a.images.shape and half_b.images.dtype == torch.float32
            assert half_b.labels.dtype == torch.int64
            limit = 1.0 + ROUNDING / 127.5
            assert half_b.images.min() >= -limit and half_b.images.max() <= limit
            assert half_a.keys == half_b.keys
            assert torch.equal(half_a.flags, half_b.flags.cpu()) and torch.equal(
                half_a.labels, half_b.labels.cpu()
            )
        # the clean half differs only by the JPEG decoder
        assert_decoded_alike(a.fr.images, b.fr.images)


def test_gpu_fr_half_is_decode_flip_normalise(dataset: Path) -> None:
    _, gpu = loaders(dataset, AugmentConfig(p_rescale=1.0, p_erase=1.0, p_color=1.0))
    gpu.set_epoch(0)
    batch = next(iter(gpu))
    assert not batch.fr.flags.any() and batch.reg.flags.all()
    store = gpu.store
    rows = {key: i for i, key in enumerate(store.keys_of(np.arange(len(store))))}
    references = []
    for key, flipped in zip(batch.fr.keys, batch.fr.flipped.tolist()):
        (data,) = store.encoded(np.array([rows[key]]))
        reference = torch.from_numpy(decode_image(data, source=key).tensor)
        references.append(reference.flip(-1) if flipped else reference)
    assert_decoded_alike(torch.stack(references), batch.fr.images)
    # erased rectangles are exact on the GPU too: every regression image holds pixel value 0 (−1)
    assert (batch.reg.images == -1.0).flatten(1).any(1).all()


# Per-degradation comparison on PNG inputs: the decoders agree exactly on lossless images, so any
# difference is the operators'. Tolerances in grey levels of the 0..255 image:
OPERATOR_TOLERANCE = {
    # nearest-neighbour shrink + linear restore: CPU and GPU kernels round the sampling
    # coordinates and the interpolated value differently: a pixel may take its neighbour's value
    "rescale": {"mean": 1.5, "p99": 24.0},
    # two rounded int16 brightness_contrast terms and a saturating cast: at most one level apart
    "color": {"mean": 0.5, "p99": 1.0},
    # the same rectangle set to 0: exact
    "erase": {"mean": 0.0, "p99": 0.0},
    "none": {"mean": 0.0, "p99": 0.0},
}


def _png_batch(count: int, degradation: str, seed: int) -> GraphBatch:
    import io

    from tests.eval_fixtures import face_image

    encoded = []
    for i in range(count):
        buffer = io.BytesIO()
        face_image(seed * 100 + i).save(buffer, format="PNG")
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    rng = np.random.default_rng(seed)
    params = draw_params(AugmentConfig(p_rescale=0.0, p_erase=0.0, p_color=0.0), 112, count, rng)
    column = {"rescale": 0, "erase": 1, "color": 2}.get(degradation)
    flags = np.zeros((count, 3), dtype=bool)
    if column is not None:
        flags[:, column] = True
    params = dataclasses.replace(params, flags=flags)
    return GraphBatch(encoded=encoded, rows=np.arange(count, dtype=np.int64), params=params)


@pytest.mark.parametrize("degradation", ["none", "rescale", "color", "erase"])
def test_each_degradation_on_the_gpu_matches_the_cpu(degradation: str) -> None:
    batch = _png_batch(16, degradation, seed=3)
    cpu = run_graph(batch, image_size=112, device_id=None)
    gpu = run_graph(batch, image_size=112, device_id=0)
    for name in ("rows", "flip", "flags"):
        assert np.array_equal(cpu[name], gpu[name]), name
    levels = np.abs(cpu["images"].astype(np.float64) - gpu["images"]) * 127.5
    bound = OPERATOR_TOLERANCE[degradation]
    assert levels.mean() <= bound["mean"] + ROUNDING, (degradation, levels.mean())
    assert np.percentile(levels, 99) <= bound["p99"] + ROUNDING, (degradation, np.percentile(levels, 99))
    if degradation != "none":  # the degradation did something on both devices
        clean = run_graph(_png_batch(16, "none", seed=3), image_size=112, device_id=0)["images"]
        assert np.abs(gpu["images"] - clean).mean() * 127.5 > 1.0
