"""The GPU variant of the DALI graph (decoder "mixed", GPU operators) against the CPU variant.

Skipped with a reason where there is no CUDA GPU (tests/conftest.py); runs where one is lent.
The plan (order, flags, parameters) is numpy, so both variants must agree on keys and
flags exactly; nvJPEG and libjpeg-turbo may differ by a grey level or two, so pixels
are compared with that tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.image_io import decode_image
from pipeline.data.loader import TrainLoader

pytestmark = pytest.mark.gpu

DECODER_TOLERANCE = 3.0 / 127.5  # grey levels between GPU and CPU JPEG decoders, normalised


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
            assert half_b.images.min() >= -1.0 and half_b.images.max() <= 1.0
            assert half_a.keys == half_b.keys
            assert torch.equal(half_a.flags, half_b.flags.cpu()) and torch.equal(
                half_a.labels, half_b.labels.cpu()
            )
        # the clean half differs only by the JPEG decoder
        assert (a.fr.images - b.fr.images.cpu()).abs().max() <= DECODER_TOLERANCE


def test_gpu_fr_half_is_decode_flip_normalise(dataset: Path) -> None:
    _, gpu = loaders(dataset, AugmentConfig(p_rescale=1.0, p_erase=1.0, p_color=1.0))
    gpu.set_epoch(0)
    batch = next(iter(gpu))
    assert not batch.fr.flags.any() and batch.reg.flags.all()
    store = gpu.store
    rows = {key: i for i, key in enumerate(store.keys_of(np.arange(len(store))))}
    for key, flipped, image in zip(batch.fr.keys, batch.fr.flipped.tolist(), batch.fr.images.cpu()):
        (data,) = store.encoded(np.array([rows[key]]))
        reference = torch.from_numpy(decode_image(data, source=key).tensor)
        if flipped:
            reference = reference.flip(-1)
        assert (image - reference).abs().max() <= DECODER_TOLERANCE
    # erased rectangles are exact on the GPU too: every regression image holds pixel value 0 (−1)
    assert (batch.reg.images == -1.0).flatten(1).any(1).all()
