"""The synthetic dataset: real InsightFace formats, determinism, and ground truth that means something."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.errors import DataError
from data_prep.recordio import RecordIOReader, read_index, unpack_header
from data_prep.source import read_source
from data_prep.synth import (
    MIN_STRENGTH,
    MIXED_DEGRADED_FRACTION,
    synthesize,
    synthesize_identity_set,
    synthesize_verification,
)
from data_prep.synth_faces import (
    DEGRADATIONS,
    STORAGE_JPEG_QUALITY,
    degradation_level,
    degrade,
    draw_traits,
    draw_variation,
    render_face,
)

IDENTITIES = 40


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, identities=IDENTITIES, seed=3)  # no timed assert: this machine is shared and noisy
    return out


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def train_images(folder) -> dict[int, bytes]:
    index = read_index(folder / "train.idx")
    images = {}
    with RecordIOReader(folder / "train.rec") as reader:
        source = read_source(folder)
        for record, offset in zip(source.records, source.offsets):
            payload = reader.read_at(int(offset), int(record))
            _, start = unpack_header(payload)
            images[int(record)] = payload[start:]
    assert set(images) <= set(index)
    return images


def test_train_set_is_a_valid_insightface_dataset(synth_dir):
    source = read_source(synth_dir)
    truth = pd.read_parquet(synth_dir / "ground_truth.parquet")
    assert source.layout == "insightface"
    assert source.num_classes == IDENTITIES and source.image_size == (112, 112)
    assert (synth_dir / "property").read_text().strip() == f"{IDENTITIES},112,112"
    assert list(truth.record) == list(source.records)
    assert np.array_equal(truth.identity.to_numpy(), source.labels)
    counts = truth.identity.value_counts()
    assert counts.min() >= 2 and 9 * IDENTITIES <= len(truth) <= 15 * IDENTITIES


def test_ground_truth_columns_and_shares(synth_dir):
    truth = pd.read_parquet(synth_dir / "ground_truth.parquet")
    assert set(truth.degradation) == {"none", *DEGRADATIONS}
    assert truth.strength.between(0, 1).all()
    assert (truth.strength[truth.degradation == "none"] == 0).all()
    assert (truth.strength[truth.degradation != "none"] > 0).all()
    low = truth.groupby("identity").low_variance.first()
    assert low.sum() == round(0.15 * IDENTITIES)
    ordinary = truth[~truth.low_variance]
    assert 0.35 < (ordinary.degradation == "none").mean() < 0.65  # clean_fraction 0.5
    # low-variance identities: mostly one degradation kind each, some images degraded
    degraded_low = truth[truth.low_variance & (truth.degradation != "none")]
    assert len(degraded_low) > 0
    assert (degraded_low.groupby("identity").degradation.nunique() == 1).all()


def test_low_variance_identities_are_near_duplicates(synth_dir):
    truth = pd.read_parquet(synth_dir / "ground_truth.parquet")
    images = train_images(synth_dir)

    def spread(identity: int) -> float:
        clean = truth[(truth.identity == identity) & (truth.degradation == "none")].record
        pixels = np.stack([decode(images[r]).astype(np.float32) for r in clean])
        return float(pixels.std(axis=0).mean()) if len(pixels) > 1 else float("nan")

    low = [spread(i) for i in truth[truth.low_variance].identity.unique()]
    ordinary = [spread(i) for i in truth[~truth.low_variance].identity.unique()]
    low = [x for x in low if x == x]
    assert low, "no low-variance identity with two clean images in this seed"
    assert max(low) < 0.25 * np.nanmedian(ordinary)


def test_identities_are_distinct():
    """Inside the face, two photographs of one identity differ less than photographs of two identities."""
    face = (slice(28, 92), slice(30, 82))
    within, between = [], []
    for i in range(8):
        rng = np.random.default_rng(i)
        a, b = draw_traits(rng), draw_traits(rng)
        shots = [draw_variation(np.random.default_rng([i, k]), amount=0.3) for k in range(2)]
        first, second = (render_face(a, v).astype(np.float32)[face] for v in shots)
        other = render_face(b, shots[1]).astype(np.float32)[face]
        within.append(np.abs(first - second).mean())
        between.append(np.abs(first - other).mean())
    assert np.mean(between) > 1.5 * np.mean(within)


def sharpness(pixels: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels of the grey image (edges make it large)."""
    grey = pixels.astype(np.float32).mean(axis=2)[4:-4, 4:-4]
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_degradation_strength_is_monotone(kind):
    rng = np.random.default_rng(5)
    face = render_face(draw_traits(rng), draw_variation(rng))

    def measure(strength: float) -> float:
        pixels, quality = degrade(face, kind, strength, np.random.default_rng(7))
        assert quality == STORAGE_JPEG_QUALITY  # every kind returns pixels to store as usual
        if kind == "dark":
            return -float(pixels.mean())
        # every other kind: the distance to the undegraded face grows
        return float(np.abs(pixels.astype(np.float32) - face).mean())

    values = [measure(s) for s in (0.1, 0.3, 0.6, 1.0)]
    assert values[0] < values[1] < values[2] < values[3], values
    if kind in ("blur", "lowres"):
        mild, strong = (degrade(face, kind, s, np.random.default_rng(7))[0] for s in (0.1, 1.0))
        assert sharpness(strong) < 0.5 * sharpness(mild) < 0.5 * sharpness(face)


def test_degradation_levels_grow_with_strength():
    """The calibrated strength → level tables: stronger is always worse, and 0 is no degradation."""
    worse_when_lower = {"lowres"}
    for kind in DEGRADATIONS:
        levels = [degradation_level(kind, s) for s in np.linspace(0, 1, 21)]
        steps = np.diff(levels)
        assert (steps < 0).all() if kind in worse_when_lower else (steps > 0).all(), (kind, levels)
    assert degradation_level("lowres", 0.0) == 112 and degradation_level("blur", 0.0) == 0
    with pytest.raises(ValueError, match="unknown degradation"):
        degradation_level("fog", 0.5)


def test_verification_sets(synth_dir):
    for name in ("clean", "mixed"):
        with open(synth_dir / f"{name}.bin", "rb") as f:
            bins, issame = pickle.load(f)  # our own file; untrusted ones go through data_prep.bins
        truth = pd.read_parquet(synth_dir / f"{name}_ground_truth.parquet")
        assert len(bins) == 2 * len(issame) == len(truth) == 2 * min(300, 3 * IDENTITIES)
        assert list(issame) == [pair % 2 == 0 for pair in range(len(issame))]
        assert sum(issame) == len(issame) // 2
        ids = truth.identity.to_numpy()
        assert np.array_equal(ids[0::2] == ids[1::2], np.asarray(issame))
        assert all(decode(b).shape == (112, 112, 3) for b in bins[:10])
    clean = pd.read_parquet(synth_dir / "clean_ground_truth.parquet")
    mixed = pd.read_parquet(synth_dir / "mixed_ground_truth.parquet")
    assert (clean.degradation == "none").all()
    assert np.array_equal(clean.identity, mixed.identity)
    # a minority degraded (MIXED_DEGRADED_FRACTION 0.25; 240 images: binomial std 0.028)
    assert 0.15 < (mixed.degradation != "none").mean() < 0.35
    degraded = mixed[mixed.degradation != "none"]
    assert (
        set(degraded.degradation) <= set(DEGRADATIONS) and degraded.strength.between(MIN_STRENGTH, 1.0).all()
    )
    assert (mixed.strength[mixed.degradation == "none"] == 0).all()


def test_deterministic_by_seed(tmp_path):
    for name in ("a", "b"):
        synthesize(tmp_path / name, identities=6, images_per_identity=3, verification_pairs=4, seed=11)
    synthesize(tmp_path / "c", identities=6, images_per_identity=3, verification_pairs=4, seed=12)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "train.rec" in files and "clean.bin" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()


def test_workers_do_not_change_the_output(tmp_path):
    for name, workers in (("one", 1), ("two", 2)):
        synthesize(
            tmp_path / name,
            identities=5,
            images_per_identity=3,
            verification_pairs=6,
            seed=4,
            workers=workers,
        )
    for path in sorted((tmp_path / "one").iterdir()):
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name


def test_fresh_verification_sets_only(tmp_path):
    bins = synthesize_verification(tmp_path / "v", identities=12, pairs=10, seed=8)
    assert set(bins) == {"clean", "mixed"} and not (tmp_path / "v" / "train.rec").exists()
    with open(bins["clean"], "rb") as f:
        images, issame = pickle.load(f)
    assert len(images) == 20 and sum(issame) == 5
    truth = pd.read_parquet(tmp_path / "v" / "clean_ground_truth.parquet")
    assert truth.identity.between(0, 11).all()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(DataError, match="at least one identity"):
        synthesize(tmp_path / "x", identities=0)
    with pytest.raises(DataError, match="low_variance_fraction"):
        synthesize(tmp_path / "y", identities=4, low_variance_fraction=1.5)


# ----------------------------------------------------------------------------- identity-labelled sets


def folder_files(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("idset") / "seed-1000000"
    synthesize_identity_set(out, identities=30, images_per_identity=8, seed=1000000)
    return out


def test_identity_set_counts_and_ground_truth(identity_set):
    folders = sorted(p.name for p in identity_set.iterdir() if p.is_dir())
    assert folders == [f"id-{i:05d}" for i in range(30)]
    assert all(
        sorted(p.name for p in (identity_set / f).iterdir()) == [f"{n}.jpg" for n in range(8)]
        for f in folders
    )
    truth = pd.read_parquet(identity_set / "ground_truth.parquet")
    assert list(truth.columns) == ["path", "identity", "image", "degradation", "strength"]
    assert len(truth) == 240 and sorted(truth.path) == sorted(
        p.relative_to(identity_set).as_posix() for p in identity_set.rglob("*.jpg")
    )
    assert (truth.path.str.slice(3, 8).astype(int) == truth.identity).all()
    for path in truth.path[:5]:
        assert decode((identity_set / path).read_bytes()).shape == (112, 112, 3)
    degraded = truth[truth.degradation != "none"]
    # the mixed verification set's share (0.25) and strength floor; binomial sd at 240 images ≈ 0.028
    assert abs(len(degraded) / len(truth) - MIXED_DEGRADED_FRACTION) < 0.1
    assert set(degraded.degradation) <= set(DEGRADATIONS)
    assert (
        degraded.strength.between(MIN_STRENGTH, 1.0).all()
        and (truth.strength[truth.degradation == "none"] == 0).all()
    )


def test_identity_set_is_a_function_of_its_seed(identity_set, tmp_path):
    again = tmp_path / "again"
    synthesize_identity_set(again, identities=30, images_per_identity=8, seed=1000000, workers=2)
    assert folder_files(again) == folder_files(identity_set)
    other = tmp_path / "other"
    synthesize_identity_set(other, identities=30, images_per_identity=8, seed=1000001)
    differing = [
        p
        for p, data in folder_files(other).items()
        if p.endswith(".jpg") and data != (identity_set / p).read_bytes()
    ]
    assert len(differing) == 240
    before = (again / "synth.json").stat().st_mtime_ns
    synthesize_identity_set(
        again, identities=30, images_per_identity=8, seed=1000000
    )  # complete: left as it is
    assert (again / "synth.json").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="holds something else"):
        synthesize_identity_set(again, identities=31, images_per_identity=8, seed=1000000)


def test_identity_set_converts_like_any_folder_and_joins_its_ground_truth(identity_set, tmp_path):
    from data_prep.convert import convert

    info = convert(identity_set, tmp_path / "conv", samples_per_shard=100, progress=False)
    manifest = pd.read_parquet(info.manifest_path)
    truth = pd.read_parquet(identity_set / "ground_truth.parquet")
    joined = manifest.merge(truth, on="path", validate="one_to_one")
    assert len(joined) == len(truth) == info.num_images and info.num_classes == 30
    assert (joined.label == joined.identity).all()


def test_identity_set_cli_refuses_options_of_the_training_set(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "set"
    code = main(
        ["prep", "synth", "--identity-set", "--out", str(out), "--clean-fraction", "0.2", "--no-track"]
    )
    assert (
        code == 2 and "--clean-fraction: not options of an identity-labelled set" in capsys.readouterr().err
    )
    with pytest.raises(DataError, match="at least 2 identities with at least 2 images"):
        synthesize_identity_set(out, identities=1, images_per_identity=8)
