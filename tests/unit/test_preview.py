"""`igfiqa data preview`: the grid shows clean images beside correctly captioned regression versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.config import AugmentConfig
from pipeline.data.image_io import decode_image
from pipeline.data.image_store import ImageStore
from pipeline.data.preview import preview_tiles, render_grid


@pytest.fixture(scope="module")
def tiles(train_dataset: Path) -> list:
    augment = AugmentConfig(p_rescale=0.5, p_erase=0.5, p_color=0.5)
    return preview_tiles(train_dataset, augment, identities=4, versions=6, seed=1)


def test_each_row_is_one_identity_with_its_clean_image_first(train_dataset: Path, tiles: list) -> None:
    store = ImageStore(train_dataset)
    all_keys = store.keys_of(np.arange(len(store)))
    assert len(tiles) == 4 and all(len(row) == 7 for row in tiles)
    assert len({row[0].label for row in tiles}) == 4
    for row in tiles:
        assert len({t.key for t in row}) == 1
        clean = row[0]
        assert clean.caption == "clean" and clean.flags == (False, False, False)
        (data,) = store.encoded(np.array([all_keys.index(clean.key)]))
        reference = np.rint(decode_image(data, source=clean.key).tensor * 127.5 + 127.5).astype(np.uint8)
        assert np.array_equal(clean.pixels, reference.transpose(1, 2, 0))
        for version in row[1:]:
            assert version.pixels.shape == clean.pixels.shape and version.pixels.dtype == np.uint8
            flipped = version.caption.startswith("flip")
            upright = version.pixels[:, ::-1] if flipped else version.pixels
            if not any(version.flags):
                assert version.caption.endswith("clean")
                assert np.array_equal(upright, clean.pixels)
            else:
                assert not np.array_equal(upright, clean.pixels)
            for name, flag in zip(("rescale", "erase", "color"), version.flags):
                assert (name in version.caption) == flag


def test_versions_cover_each_degradation(tiles: list) -> None:
    flags = np.array([t.flags for row in tiles for t in row[1:]])
    assert flags.any(axis=0).all()


def test_render_grid_writes_a_picture(tiles: list, tmp_path: Path) -> None:
    out = render_grid(tiles, tmp_path / "sub" / "grid.png")
    with Image.open(out) as image:
        width, height = image.size
    assert width > 7 * 112 and height > 4 * 112


def test_cli_writes_the_grid_and_refuses_a_missing_dataset(
    train_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grid.png"
    argv = ["data", "preview", str(train_dataset), "--out", str(out), "--identities", "2", "--versions", "2"]
    assert main([*argv, "--set", "data.augment.p_erase=1.0"]) == 0
    assert out.is_file() and out.stat().st_size > 10_000
    assert main(["data", "preview", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*argv, "--set", "data.augment.p_erase=2"]) == 2
    assert "p_erase" in capsys.readouterr().err
