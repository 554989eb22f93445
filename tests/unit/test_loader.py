"""The torch-facing DALI loader on the CPU: halves, flags, ranks, seeds and resuming mid-epoch."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep.dataset import load_dataset_info
from data_prep.errors import DataError
from pipeline.config import AugmentConfig, BatchLayout, ConfigError, DataConfig
from pipeline.data.image_io import decode_image
from pipeline.data.loader import StepBatch, TrainLoader

SIZE = 112


def make_loader(dataset: Path, *, rank: int = 0, world_size: int = 1, **data) -> TrainLoader:
    augment = data.pop("augment", AugmentConfig())
    cfg = DataConfig(dataset=str(dataset), fr_batch=16, reg_batch=16, num_threads=1, augment=augment)
    cfg = dataclasses.replace(cfg, **data)
    if world_size == 1:
        return TrainLoader(cfg)  # one process: the loader lays the batches out itself
    layout = BatchLayout.of(cfg, world_size, load_dataset_info(dataset).num_images, rank)
    return TrainLoader(cfg, layout)


def epoch_batches(loader: TrainLoader, epoch: int, start_step: int = 0) -> list[StepBatch]:
    loader.set_epoch(epoch, start_step)
    return list(loader)


@pytest.fixture(scope="module")
def manifest(train_dataset: Path) -> pd.DataFrame:
    return pd.read_parquet(train_dataset / "manifest.parquet").set_index("key")


@pytest.fixture(scope="module")
def clean_images(train_dataset: Path, manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    """key → PIL decode + normalise (no flip), [3, H, W], read straight from the tars."""
    out = {}
    for key, row in manifest.iterrows():
        tar = train_dataset / "shards" / f"shard-{row['shard']:05d}.tar"
        with open(tar, "rb") as handle:
            handle.seek(row["offset"])
            out[key] = decode_image(handle.read(row["nbytes"]), source=key).tensor
    return out


def pixels(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    return np.rint(array * 127.5 + 127.5).astype(np.int64)


def clean_of(clean_images: dict[str, np.ndarray], keys: list[str], flipped: torch.Tensor) -> np.ndarray:
    return np.stack(
        [clean_images[k][:, :, ::-1] if f else clean_images[k] for k, f in zip(keys, flipped.tolist())]
    )


def test_batches_have_the_contract_layout_and_the_manifest_labels(
    train_dataset: Path, manifest: pd.DataFrame
) -> None:
    loader = make_loader(train_dataset, fr_batch=8, reg_batch=24)
    assert loader.steps_per_epoch == len(manifest) // 32 == len(loader)
    batches = epoch_batches(loader, 0)
    assert [b.step for b in batches] == list(range(loader.steps_per_epoch))
    for batch in batches:
        for half, n in ((batch.fr, 8), (batch.reg, 24)):
            assert half.images.shape == (n, 3, SIZE, SIZE) and half.images.dtype == torch.float32
            assert half.images.min() >= -1.0 and half.images.max() <= 1.0
            assert half.labels.dtype == torch.int64 and half.labels.shape == (n,)
            assert half.flags.shape == (n, 3) and half.flags.dtype == torch.bool
            assert half.flipped.shape == (n,) and half.flipped.dtype == torch.bool
            assert half.labels.tolist() == manifest.loc[half.keys, "label"].tolist()
        assert not set(batch.fr.keys) & set(batch.reg.keys)
    assert loader.num_classes == manifest["label"].nunique()


def test_fr_half_is_decode_flip_normalise_pixel_for_pixel(train_dataset: Path, clean_images: dict) -> None:
    loader = make_loader(train_dataset, augment=AugmentConfig(p_rescale=1.0, p_erase=1.0, p_color=1.0))
    for batch in epoch_batches(loader, 1):
        assert not batch.fr.flags.any()
        reference = clean_of(clean_images, batch.fr.keys, batch.fr.flipped)
        assert np.array_equal(pixels(batch.fr.images), pixels(reference))
        np.testing.assert_allclose(batch.fr.images.numpy(), reference, rtol=0, atol=1e-6)


def test_an_empty_regression_half_yields_fr_rows_only(train_dataset: Path, clean_images: dict) -> None:
    # loss.mode fr (reg_batch 0): the graph gets FR rows only, every degradation branch stays empty
    loader = make_loader(train_dataset, reg_batch=0, augment=AugmentConfig(p_rescale=1.0, p_erase=1.0))
    assert loader.steps_per_epoch == load_dataset_info(train_dataset).num_images // 16
    batches = epoch_batches(loader, 0)
    assert len(batches) == loader.steps_per_epoch
    for batch in batches:
        assert batch.fr.images.shape == (16, 3, SIZE, SIZE) and not batch.fr.flags.any()
        assert batch.reg.images.shape == (0, 3, SIZE, SIZE) and len(batch.reg) == 0
        assert batch.reg.labels.shape == (0,) and batch.reg.flags.shape == (0, 3)
        reference = clean_of(clean_images, batch.fr.keys, batch.fr.flipped)
        assert np.array_equal(pixels(batch.fr.images), pixels(reference))
    keys = [k for b in batches for k in b.fr.keys]
    assert len(set(keys)) == len(keys) == 16 * loader.steps_per_epoch


def test_single_batch_mode_degrades_the_fr_half(train_dataset: Path, clean_images: dict) -> None:
    # data.batch_mode single (CR-FIQA's training): the one batch is the FR half, degraded as the
    # regression half would be; what the flags say happened is in the pixels
    every = AugmentConfig(p_rescale=1.0, p_erase=0.0, p_color=0.0)
    loader = make_loader(train_dataset, reg_batch=0, batch_mode="single", augment=every)
    for batch in epoch_batches(loader, 0)[:3]:
        assert len(batch.reg) == 0 and batch.fr.flags[:, 0].all() and not batch.fr.flags[:, 1:].any()
        reference = clean_of(clean_images, batch.fr.keys, batch.fr.flipped)
        for degraded, clean in zip(pixels(batch.fr.images), pixels(reference)):
            assert not np.array_equal(degraded, clean)  # rescaled: blurred
    split = make_loader(train_dataset, reg_batch=0, augment=every)
    assert [b.fr.keys for b in epoch_batches(split, 0)] == [b.fr.keys for b in epoch_batches(loader, 0)]


def test_degradation_frequencies_lie_within_binomial_bounds(train_dataset: Path) -> None:
    p = (0.3, 0.2, 0.5)
    augment = AugmentConfig(p_rescale=p[0], p_erase=p[1], p_color=p[2])
    loader = make_loader(train_dataset, fr_batch=8, reg_batch=56, augment=augment)
    reg_flags, fr_flags, flips = [], [], []
    for epoch in range(2):
        for batch in epoch_batches(loader, epoch):
            reg_flags.append(batch.reg.flags)
            fr_flags.append(batch.fr.flags)
            flips.append(torch.cat([batch.fr.flipped, batch.reg.flipped]))
    flags = torch.cat(reg_flags).numpy()
    n = len(flags)
    for column, prob in enumerate(p):
        spread = 4 * np.sqrt(n * prob * (1 - prob))
        assert abs(flags[:, column].sum() - n * prob) <= spread, column
    assert not torch.cat(fr_flags).any()
    flipped = torch.cat(flips).numpy()
    assert abs(flipped.sum() - len(flipped) / 2) <= 4 * np.sqrt(len(flipped) / 4)


def test_flags_agree_with_the_pixels(train_dataset: Path, clean_images: dict) -> None:
    loader = make_loader(
        train_dataset, fr_batch=8, reg_batch=56, augment=AugmentConfig(p_rescale=0.4, p_erase=0.4)
    )
    loader.set_epoch(0)
    seen = np.zeros(4, dtype=int)  # clean, rescale only, erase, color only
    for batch in loader:
        params = loader.graph_batch(0, batch.step).params.take(slice(8, None))
        clean = clean_of(clean_images, batch.reg.keys, batch.reg.flipped)
        got = pixels(batch.reg.images)
        for i, (rescale, erase, color) in enumerate(batch.reg.flags.tolist()):
            assert [rescale, erase, color] == params.flags[i].tolist()
            if not (rescale or erase or color):
                assert np.array_equal(got[i], pixels(clean[i]))
                seen[0] += 1
                continue
            assert not np.array_equal(got[i], pixels(clean[i]))
            if erase:
                (y, x), (h, w) = params.erase_anchor[i].astype(int), params.erase_shape[i].astype(int)
                image = batch.reg.images[i].numpy()
                if params.flip[i]:
                    image = image[:, :, ::-1]
                assert (image[:, y : y + h, x : x + w] == -1.0).all()  # pixel value 0 before normalising
                seen[2] += 1
            elif rescale and not color:
                seen[1] += 1
            elif color and not rescale:
                seen[3] += 1
    assert (seen > 0).all(), seen


def test_probability_zero_leaves_the_regression_half_clean_and_one_degrades_all(
    train_dataset: Path, clean_images: dict
) -> None:
    off = make_loader(train_dataset, augment=AugmentConfig(p_rescale=0.0, p_erase=0.0, p_color=0.0))
    for batch in epoch_batches(off, 0):
        assert not batch.reg.flags.any()
        assert np.array_equal(
            pixels(batch.reg.images), pixels(clean_of(clean_images, batch.reg.keys, batch.reg.flipped))
        )
    on = make_loader(train_dataset, augment=AugmentConfig(p_rescale=1.0, p_erase=1.0, p_color=1.0))
    for batch in epoch_batches(on, 0):
        assert batch.reg.flags.all()
        assert (batch.reg.images == -1.0).flatten(1).any(1).all()


def test_two_ranks_split_the_global_batch_of_one_rank(train_dataset: Path) -> None:
    single = epoch_batches(make_loader(train_dataset), 3)
    ranks = [epoch_batches(make_loader(train_dataset, rank=r, world_size=2), 3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    covered: list[str] = []
    for whole, part0, part1 in zip(single, *ranks):
        for name in ("fr", "reg"):
            halves = [getattr(part0, name), getattr(part1, name)]
            assert len(halves[0]) == len(halves[1]) == 8
            assert getattr(whole, name).keys == halves[0].keys + halves[1].keys
            assert torch.equal(getattr(whole, name).images, torch.cat([h.images for h in halves]))
            assert torch.equal(getattr(whole, name).flags, torch.cat([h.flags for h in halves]))
            covered += halves[0].keys + halves[1].keys
    assert len(covered) == len(set(covered)) == len(single) * 32


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(train_dataset: Path) -> None:
    first = epoch_batches(make_loader(train_dataset, seed=5), 2)
    again = epoch_batches(make_loader(train_dataset, seed=5), 2)
    other = epoch_batches(make_loader(train_dataset, seed=6), 2)
    for a, b in zip(first, again):
        assert a.fr.keys == b.fr.keys and a.reg.keys == b.reg.keys
        assert torch.equal(a.reg.flags, b.reg.flags) and torch.equal(a.fr.flipped, b.fr.flipped)
        assert torch.equal(a.reg.images, b.reg.images) and torch.equal(a.fr.images, b.fr.images)
    assert [b.fr.keys for b in first] != [b.fr.keys for b in other]


def test_epochs_are_reshuffled(train_dataset: Path) -> None:
    loader = make_loader(train_dataset)
    assert [b.fr.keys for b in epoch_batches(loader, 0)] != [b.fr.keys for b in epoch_batches(loader, 1)]


def test_resuming_at_step_k_continues_the_uninterrupted_epoch(train_dataset: Path) -> None:
    full = epoch_batches(make_loader(train_dataset), 4)
    k = 5
    # a fresh loader (a restarted job), and one interrupted mid-epoch then repositioned
    resumed = epoch_batches(make_loader(train_dataset), 4, start_step=k)
    interrupted = make_loader(train_dataset)
    interrupted.set_epoch(4)
    for batch in interrupted:
        if batch.step == 2:
            break
    assert len(interrupted) == len(full)
    interrupted.set_epoch(4, k)
    assert len(interrupted) == len(full) - k
    with pytest.raises(ValueError, match="start_step"):
        interrupted.set_epoch(4, len(full) + 1)
    repositioned = epoch_batches(interrupted, 4, start_step=k)
    for run in (resumed, repositioned):
        assert [b.step for b in run] == list(range(k, len(full)))
        for a, b in zip(full[k:], run):
            assert a.reg.keys == b.reg.keys and torch.equal(a.reg.flags, b.reg.flags)
            assert torch.equal(a.reg.images, b.reg.images) and torch.equal(a.fr.images, b.fr.images)
    # and the next epoch after a resumed one is the ordinary next epoch
    assert [b.fr.keys for b in epoch_batches(interrupted, 5)] == [
        b.fr.keys for b in epoch_batches(make_loader(train_dataset), 5)
    ]


def test_batches_kept_by_the_caller_are_not_overwritten(train_dataset: Path) -> None:
    loader = make_loader(train_dataset)
    loader.set_epoch(0)
    kept = []
    for batch in loader:
        kept.append((batch.reg.images, batch.reg.images.clone()))
    assert all(torch.equal(a, b) for a, b in kept)
    assert not torch.equal(kept[0][1], kept[1][1])


def test_configuration_that_does_not_fit_the_dataset_is_refused(train_dataset: Path) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        make_loader(train_dataset, image_size=96)
    with pytest.raises(ConfigError, match="num_classes"):
        make_loader(train_dataset, num_classes=7)
    with pytest.raises(ConfigError, match="world size"):
        make_loader(train_dataset, fr_batch=15, world_size=2)
    with pytest.raises(ConfigError, match="cannot fill"):
        make_loader(train_dataset, fr_batch=512, reg_batch=512)
    cfg = DataConfig(dataset=str(train_dataset), fr_batch=16, reg_batch=16, num_threads=1)
    with pytest.raises(ValueError, match="is not a layout of"):
        TrainLoader(cfg, BatchLayout.of(cfg, 2, 10_000, 1))  # a layout of another data set
    with pytest.raises(DataError, match="does not exist"):
        make_loader(train_dataset.parent / "nowhere")


def test_a_manifest_pointing_at_wrong_bytes_names_the_tar_and_the_key(
    train_dataset: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(train_dataset, broken)
    table = pd.read_parquet(broken / "manifest.parquet")
    table.loc[:, "offset"] += 1  # every image now starts one byte late
    table.to_parquet(broken / "manifest.parquet")
    loader = make_loader(broken)
    loader.set_epoch(0)
    with pytest.raises(DataError, match=r"shard-0000\d\.tar.*not a JPEG or PNG"):
        next(iter(loader))
    table.loc[0, "offset"] = 10**9
    table.to_parquet(broken / "manifest.parquet")
    with pytest.raises(DataError, match="do not lie inside the shard"):
        make_loader(broken)


def corrupt_copy(train_dataset: Path, tmp_path: Path, step: int, damage) -> tuple[Path, int, str, Path, int]:
    """A copy of the dataset where one image of `step` (epoch 0, 16 + 16) is changed by `damage`
    in place (same size): (dataset, manifest row, key, shard tar, byte offset)."""
    dataset = tmp_path / "train"
    shutil.copytree(train_dataset, dataset)
    row = int(make_loader(dataset).graph_batch(0, step).rows[5])
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    key, shard, offset, nbytes = manifest.loc[row, ["key", "shard", "offset", "nbytes"]]
    tar = dataset / "shards" / f"shard-{shard:05d}.tar"
    blob = bytearray(tar.read_bytes())
    blob[offset : offset + nbytes] = damage(bytes(blob[offset : offset + nbytes]))
    tar.write_bytes(bytes(blob))
    return dataset, row, key, tar, int(offset)


def undefined_quant_table(image: bytes) -> bytes:
    """Sound structure, but the frame names a quantisation table the file never defines."""
    blob = bytearray(image)
    blob[blob.index(b"\xff\xc0") + 12] = 3  # component 1's table selector
    return bytes(blob)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_an_image_dali_cannot_decode_is_named_by_shard_and_key(
    train_dataset: Path, tmp_path: Path, device: str
) -> None:
    """An image broken after conversion that even the structural check passes: DALI's own error
    names neither the sample nor the shard; the loader's names both (issue 16, item 1)."""
    dataset, row, key, tar, offset = corrupt_copy(train_dataset, tmp_path, 2, undefined_quant_table)
    cfg = DataConfig(dataset=str(dataset), fr_batch=16, reg_batch=16, num_threads=1, augment=AugmentConfig())
    loader = TrainLoader(cfg, device=device)
    loader.set_epoch(0)
    steps = []
    with pytest.raises(DataError) as err:
        for batch in loader:
            steps.append(batch.step)
    message = str(err.value)
    assert steps == [0, 1]
    assert message.startswith(
        f"{tar}: key {key} (manifest row {row}, byte offset {offset}) cannot be decoded"
    )
    assert "does not decode" in message and "epoch 0 step 2" in message and "--verify-decode" in message
    # a fresh iteration over the good steps still works (the failed pipeline was released)
    loader.set_epoch(0, start_step=3)
    assert next(iter(loader)).step == 3


def test_a_structurally_broken_image_is_named_before_dali_sees_it(
    train_dataset: Path, tmp_path: Path
) -> None:
    """Garbage in a JPEG's header segments makes DALI's CPU decoder crash the process; the
    loader's check of every image it feeds stops first, naming the shard and the key."""

    def garbage_header(image: bytes) -> bytes:
        noise = np.random.default_rng(0).integers(0, 256, 196, dtype=np.uint8).tobytes()
        return image[:4] + noise + image[200:]

    dataset, row, key, tar, offset = corrupt_copy(train_dataset, tmp_path, 1, garbage_header)
    loader = make_loader(dataset)
    loader.set_epoch(0)
    with pytest.raises(DataError) as err:
        list(loader)
    message = str(err.value)
    assert message.startswith(f"{tar}, byte offset {offset}: key {key} (manifest row {row}): JPEG")
    assert "prep inspect" in message and "--verify" in message
