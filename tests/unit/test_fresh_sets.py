"""The efficacy stage's fresh verification sets: reused when finished, made again when the
generator that made them has changed since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.synth import generator_settings
from pipeline.evaluation.efficacy import make_fresh_sets


def test_sets_of_an_earlier_generator_are_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sets = make_fresh_sets(tmp_path, 5, pairs=12, identities=6)
    settings_path = sets.synth / "synth.json"
    settings = json.loads(settings_path.read_text())
    assert settings["generator"] == generator_settings() and settings["seed"] == 5
    mixed = (sets.synth / "mixed.bin").read_bytes()

    stamp = (sets.val / "mixed" / "dataset.json").stat().st_mtime_ns
    assert make_fresh_sets(tmp_path, 5, pairs=12, identities=6).val == sets.val  # finished: reused
    assert (sets.val / "mixed" / "dataset.json").stat().st_mtime_ns == stamp

    # what a set made before the generator drew degraded images from 0.35 looks like
    old = {**settings, "generator": {"min_strength": 0.15, "mixed_degraded_fraction": 0.25}}
    settings_path.write_text(json.dumps(old))
    (sets.synth / "mixed.bin").write_bytes(b"not what this generator makes")
    with caplog.at_level("WARNING"):
        again = make_fresh_sets(tmp_path, 5, pairs=12, identities=6)
    assert "earlier generator" in caplog.text
    assert json.loads((again.synth / "synth.json").read_text())["generator"] == generator_settings()
    assert (again.synth / "mixed.bin").read_bytes() == mixed  # the same seed, the same sets

    with pytest.raises(ValueError, match="other settings"):
        make_fresh_sets(tmp_path, 5, pairs=14, identities=6)
