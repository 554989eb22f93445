"""Shared unit-test fixtures: a small synthetic dataset converted to shards, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# 40 identities × ~10 images: enough for several steps of 16 + 16 and for frequency checks.
TRAIN_IDENTITIES = 40
TRAIN_IMAGES_PER_IDENTITY = 10
SAMPLES_PER_SHARD = 150  # several shards, so reads cross tar files


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted training dataset (`igfiqa prep synth` + `prep convert`) of ~400 images, 40 classes."""
    from data_prep.convert import convert
    from data_prep.synth import synthesize

    root = tmp_path_factory.mktemp("train_dataset")
    synthesize(
        root / "synth", identities=TRAIN_IDENTITIES, images_per_identity=TRAIN_IMAGES_PER_IDENTITY, seed=0
    )
    convert(root / "synth", root / "train", samples_per_shard=SAMPLES_PER_SHARD, progress=False)
    return root / "train"
