"""pipeline.config: defaults, YAML, dotted overrides, and every refusal naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    BatchLayout,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    replace_section,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_settings() -> None:
    config = TrainConfig()
    assert (config.data.fr_batch, config.data.reg_batch) == (512, 512)
    assert (config.loss.scale, config.loss.arc_margin, config.loss.lambda_ig) == (64.0, 0.5, 10.0)
    assert (config.variance.alpha_start, config.variance.alpha_end) == (0.9, 1.0)
    assert (config.optim.lr, config.optim.momentum, config.optim.weight_decay) == (0.1, 0.9, 5e-4)


@pytest.mark.parametrize("name", ["tiny_cpu", "protocol_s", "protocol_l"])
def test_shipped_configs_load_and_round_trip(name: str) -> None:
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config_from_dict(config_to_dict(config)) == config


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\n  milestones: [3, 5]\nmodel:\n  backbone: iresnet_mini\n")
    config = load_config(path, ["optim.lr=0.05", "run.name=x", "loss.mode=cr"])
    assert config.optim.lr == 0.05 and config.optim.milestones == (3, 5)
    assert config.model.backbone == "iresnet_mini" and config.run.name == "x" and config.loss.mode == "cr"
    assert isinstance(config.optim.lr, float)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"optim": {"lrr": 0.1}}, r"optim\.lrr: unknown key \(known: .*lr"),
        ({"optimizer": {}}, r"optimizer: unknown key"),
        ({"optim": {"epochs": 2.5}}, r"optim\.epochs: expected an integer, got float 2\.5"),
        ({"optim": {"epochs": True}}, r"optim\.epochs: expected an integer, got bool"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got str 'fast'"),
        ({"run": {"deterministic": "yes"}}, r"run\.deterministic: expected true/false"),
        ({"loss": {"mode": "arc"}}, r"loss\.mode: 'arc' is not one of 'ig', 'cr', 'fr'"),
        ({"optim": {"milestones": 3}}, r"optim\.milestones: expected a list"),
        ({"optim": 3}, r"optim: expected a mapping"),
        ({"optim": {"lr": 0}}, r"optim\.lr: 0\.0 must be positive"),
        ({"optim": {"milestones": [5, 3]}}, r"must be increasing"),
        ({"data": {"augment": {"p_erase": 1.5}}}, r"data\.augment\.p_erase: 1\.5 is not a probability"),
        ({"variance": {"alpha_start": 1.2}}, r"variance\.alpha_start: 1\.2 must lie in \[0, 1\]"),
        ({"run": {"keep_checkpoints": 0}}, r"run\.keep_checkpoints: 0 must be >= 1"),
        ({"optim": {"momentum": 1.0}}, r"optim\.momentum: 1\.0 must lie in \[0, 1\)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tree: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tree)


def test_a_section_or_list_with_nothing_under_it_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  milestones:\nloss:\n# loss:\n#   mode: cr\n")
    config = load_config(path)
    assert config.optim.milestones == () and config.loss == TrainConfig().loss
    assert load_config(path, ["loss.mode=cr"]).loss.mode == "cr"  # an override fills the empty section
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got NoneType"):
        load_config(None, ["optim.lr=null"])


def test_a_bad_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"{path}: optim\.lr: -1\.0 must be positive"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr", "expected key=value"),
        ("=3", "empty key"),
        ("optim.lr.x=1", "optim.lr: expected a number, got dict"),
    ],
)
def test_malformed_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_batch_layout_splits_each_half_over_the_ranks() -> None:
    data = config_from_dict({"data": {"fr_batch": 6, "reg_batch": 4}}).data
    layouts = [BatchLayout.of(data, 2, 105, rank) for rank in range(2)]
    for layout in layouts:
        assert (layout.global_batch, layout.fr_per_rank, layout.reg_per_rank, layout.rank_batch) == (
            10,
            3,
            2,
            5,
        )
        assert layout.steps_per_epoch == 10  # 105 // 10: the remainder is dropped
    assert [(lay.fr_offset, lay.reg_offset) for lay in layouts] == [(0, 0), (3, 2)]
    single = BatchLayout.of(data, 1, 105)
    assert (single.fr_per_rank, single.reg_per_rank, single.steps_per_epoch) == (6, 4, 10)


@pytest.mark.parametrize(
    ("world_size", "rank", "num_images", "message"),
    [
        (3, 0, 100, r"^data\.reg_batch: 4 is not divisible by the world size 3$"),
        (4, 0, 100, r"^data\.fr_batch: 6 is not divisible by the world size 4$"),
        (0, 0, 100, r"world size 0 must be >= 1"),
        (2, 2, 100, r"rank 2 is outside \[0, 2\)"),
        (1, 0, 9, r"data\.fr_batch \+ data\.reg_batch = 6 \+ 4: the 9 images of work/demo/train cannot fill"),
    ],
)
def test_batch_layout_refuses_what_does_not_split(
    world_size: int, rank: int, num_images: int, message: str
) -> None:
    data = config_from_dict({"data": {"fr_batch": 6, "reg_batch": 4}}).data
    with pytest.raises(ConfigError, match=message):
        BatchLayout.of(data, world_size, num_images, rank)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (
            {"loss": {"mode": "fr"}},
            r"^loss\.mode fr trains face recognition only, with no regression half: set data\.reg_batch: 0 "
            r"\(it is 512\)$",
        ),
        (
            {"data": {"reg_batch": 0}},
            r"^data\.reg_batch: 0 leaves no regression half, which only loss\.mode fr or data\.batch_mode "
            r"single trains without \(loss\.mode is ig\)",
        ),
        (
            {"data": {"batch_mode": "single"}},
            r"^data\.batch_mode single trains both losses on one batch of data\.fr_batch images: set "
            r"data\.reg_batch: 0 \(it is 512\)$",
        ),
        (
            {"data": {"batch_mode": "single", "reg_batch": 0}, "loss": {"mode": "fr"}},
            r"^data\.batch_mode single trains the regression loss on the one batch; loss\.mode fr has none",
        ),
        ({"data": {"batch_mode": "both"}}, r"data\.batch_mode"),
        ({"data": {"reg_batch": 0}, "loss": {"mode": "cr"}}, r"\(loss\.mode is cr\)"),
        ({"data": {"reg_batch": -2}, "loss": {"mode": "fr"}}, r"^data\.reg_batch: -2 must be >= 0"),
        (
            {"data": {"reg_batch": 0}, "loss": {"mode": "fr"}, "variance": {"update_from": "reg"}},
            r"^variance\.update_from: reg needs a regression half",
        ),
    ],
)
def test_face_recognition_only_goes_with_an_empty_regression_half(tree: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tree)


@pytest.mark.parametrize("mode", ["ig", "cr"])
def test_single_batch_mode_takes_the_one_batch_as_the_fr_half(mode: str) -> None:
    config = config_from_dict(
        {"data": {"fr_batch": 8, "reg_batch": 0, "batch_mode": "single"}, "loss": {"mode": mode}}
    )
    layout = BatchLayout.of(config.data, 2, 100)
    sizes = (layout.global_batch, layout.fr_per_rank, layout.reg_per_rank, layout.steps_per_epoch)
    assert sizes == (8, 4, 0, 12)
    assert TrainConfig().data.batch_mode == "split"


def test_an_empty_regression_half_lays_out_the_fr_half_alone() -> None:
    config = config_from_dict({"data": {"fr_batch": 6, "reg_batch": 0}, "loss": {"mode": "fr"}})
    layouts = [BatchLayout.of(config.data, 2, 105, rank) for rank in range(2)]
    for layout in layouts:
        sizes = (layout.global_batch, layout.fr_per_rank, layout.reg_per_rank, layout.rank_batch)
        assert sizes == (6, 3, 0, 3) and layout.steps_per_epoch == 17  # 105 // 6
    assert [(lay.fr_offset, lay.reg_offset) for lay in layouts] == [(0, 0), (3, 0)]


def test_replace_section_rechecks() -> None:
    config = TrainConfig()
    assert replace_section(config, optim={"lr": 0.01}).optim.lr == 0.01
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        replace_section(config, optim={"lr": -0.01})
    with pytest.raises(ConfigError, match="unknown config section nope"):
        replace_section(config, nope={})


def test_overrides_are_blamed_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"^--set 'optim\.lrr=0\.1': optim\.lrr: unknown key"):
        load_config(path, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"^--set 'optim\.lr=-1': optim\.lr: -1\.0 must be positive"):
        load_config(path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"^--set 'optim\.lr=-1': optim\.lr: -1\.0 must be positive"):
        load_config(path, ["optim.lr=-1", "optim.epochs=3"])
    with pytest.raises(ConfigError, match=r"^--set 'loss\.mode=fr': loss\.mode fr trains face recognition"):
        load_config(path, ["loss.mode=fr", "optim.epochs=3"])


def test_keys_that_go_together_can_be_set_one_after_the_other() -> None:
    for overrides in (["loss.mode=fr", "data.reg_batch=0"], ["data.reg_batch=0", "loss.mode=fr"]):
        config = load_config(None, overrides)
        assert (config.loss.mode, config.data.reg_batch) == ("fr", 0)
    # a range error that an override brings in and a later one repairs is no error
    assert load_config(None, ["optim.lr=-1", "optim.lr=0.2"]).optim.lr == 0.2


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr: .* is not a finite number"):
        load_config(None, [f"optim.lr={value}"])


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, 9):
        prev, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    lines.append("optim:\n  milestones: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    with pytest.raises(ConfigError, match="more than 64 aliases") as raised:
        load_config(path)
    assert len(str(raised.value)) < 400


def test_huge_files_and_values_are_refused_with_short_messages(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("run:\n  name: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="a config file is at most"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.embedding_size: 100000000 is more than 16384"):
        load_config(None, ["model.embedding_size=100000000"])
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["loss.mode=" + "y" * 10_000])
    assert len(str(raised.value)) < 400 and "..." in str(raised.value)
