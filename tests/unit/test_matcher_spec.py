"""The matchers spec: the shipped one loads, bad keys, values and overrides are refused naming the
file and the key, every matcher trains FR-only, and the recipe id follows what decides the weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.stages.matcher_spec import (
    DEFAULT_SPEC,
    MatchersSpec,
    load_matchers_spec,
    matcher_config,
    recipe_id,
)
from pipeline.config import replace_section
from pipeline.config_loader import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "tiny_cpu.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def _config(spec: MatchersSpec, index: int = 0, where: Path = Path("/w")):
    return matcher_config(
        spec,
        spec.matchers[index],
        train=where / "train",
        run_dir=where / "run",
        tracking_uri="sqlite:///x.db",
    )


def test_the_shipped_spec_loads_with_two_fr_only_matchers() -> None:
    spec = load_matchers_spec(DEFAULT_SPEC)
    assert spec.names() == ["cosface-tiny", "arcface-small"] and spec.data.seed == 2_000_000
    assert spec.evaluation.seed not in (spec.data.seed, 0)
    configs = [_config(spec, i) for i in range(2)]
    for config, recipe in zip(configs, spec.matchers, strict=True):
        assert (config.loss.mode, config.data.reg_batch) == ("fr", 0)
        assert config.run.seed == config.data.seed == recipe.seed
        assert config.data.dataset == "/w/train" and config.run.dir == "/w/run"
    assert {c.model.backbone for c in configs} == {"iresnet_tiny", "iresnet_small"}
    assert {c.loss.margin for c in configs} == {"cosface", "arcface"}
    assert {c.model.embedding_size for c in configs} == {128, 256}
    assert len({r.seed for r in spec.matchers}) == 2
    # longer than the FIQA arm of configs/tiny_cpu.yaml (8 epochs of half the images as FR half)
    assert all(c.optim.epochs * 2 > 8 for c in configs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "matchers: []\nextra: 1\n",
            r"spec\.yaml: extra: unknown key \(known: matchers, data, evaluation, experiment\)",
        ),
        (
            f"matchers:\n  - {{name: a, config: {BASE}, overide: []}}\n",
            r"spec\.yaml: matchers\[0\]\.overide: unknown key \(known: name, config, seed, overrides\)",
        ),
        ("matchers:\n  - {config: x}\n", r"spec\.yaml: matchers\[0\]\.name: missing"),
        (
            "data: {identities: many}\nmatchers: []\n",
            r"spec\.yaml: data\.identities: expected an integer, got str",
        ),
        ("matchers: []\n", r"spec\.yaml: matchers: the spec names no matcher"),
        (
            f"evaluation: {{seed: 5}}\ndata: {{seed: 5}}\nmatchers:\n  - {{name: a, config: {BASE}}}\n",
            r"evaluation\.seed: 5 is the training data's seed",
        ),
        (
            f"matchers:\n  - {{name: a, config: {BASE}}}\n  - {{name: a, config: {BASE}}}\n",
            r"matchers\[1\]\.name: 'a' appears twice",
        ),
        (f"matchers:\n  - {{name: 'a/b', config: {BASE}}}\n", r"matchers\[0\]\.name: 'a/b' must be"),
        (
            "matchers:\n  - {name: a, config: nowhere.yaml}\n",
            r"matchers\[0\]\.config: .*nowhere\.yaml does not exist",
        ),
        (
            f"matchers:\n  - {{name: a, config: {BASE}, overrides: [optim.lrr=1]}}\n",
            r"spec\.yaml: matchers\[0\] \(a\): --set 'optim\.lrr=1': optim\.lrr: unknown key",
        ),
        (
            f"matchers:\n  - {{name: a, config: {BASE}, overrides: [loss.mode=ig]}}\n",
            r"matchers\[0\] \(a\): --set 'loss\.mode=ig': data\.reg_batch: 0 leaves no regression half",
        ),
    ],
)
def test_bad_specs_are_refused_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_matchers_spec(_write(tmp_path, text))


def test_config_paths_are_relative_to_the_spec_and_only_must_name_matchers(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(BASE.read_text())
    spec = load_matchers_spec(_write(tmp_path, "matchers:\n  - {name: a, config: configs/base.yaml}\n"))
    assert spec.matchers[0].config == str(tmp_path / "configs" / "base.yaml")
    assert [m.name for m in spec.select(None)] == [m.name for m in spec.select(["a"])] == ["a"]
    with pytest.raises(ConfigError, match=r"--only b: no such matcher in the spec \(it has a\)"):
        spec.select(["b"])


def test_the_recipe_id_follows_the_weights_not_the_paths() -> None:
    spec = load_matchers_spec(DEFAULT_SPEC)
    config = _config(spec)
    same = recipe_id(config, "data-a")
    assert recipe_id(_config(spec, where=Path("/elsewhere")), "data-a") == same  # paths, store: not in it
    assert recipe_id(replace_section(config, run={"experiment": "other"}), "data-a") == same
    assert recipe_id(config, "data-b") != same  # other training data
    assert recipe_id(replace_section(config, optim={"epochs": 7}), "data-a") != same
    assert recipe_id(replace_section(config, run={"seed": 5}), "data-a") != same
    assert recipe_id(_config(spec, 1), "data-a") != same
    # a value set to its default is the default: the same recipe as leaving it out
    assert recipe_id(replace_section(config, run={"deterministic": False}), "data-a") == same
