"""Study specs: the shipped ones load, bad keys and values are refused naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.study.spec import check_inputs, load_study_spec
from pipeline.config_loader import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "tiny_cpu.yaml"
MATCHERS = REPO / "configs" / "matchers" / "synthetic.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(
        f"name: t\nconfig: {BASE}\nmatchers: {{spec: {MATCHERS}}}\n"
        "evaluation: {identity_sets: [{name: u, seed: 5}]}\ntraining_data: {synthetic: {seed: 0}}\n" + text
    )
    return path


def test_the_shipped_specs_load() -> None:
    small = load_study_spec(REPO / "configs" / "study" / "small_cpu.yaml")
    assert list(small.arms) == ["CR(S-)", "IG(S-)", "IG(S)", "CR-FIQA(S)-single"]
    assert len(small.runs()) == 3 * 10 + 4
    assert [r.name for r in small.runs()[:5]] == [
        "CR(S-)-s0",
        "IG(S-)-s0",
        "IG(S)-s0",
        "CR-FIQA(S)-single-s0",
        "CR(S-)-s1",
    ]
    assert small.out == str(REPO / "work" / "study-small") and small.experiment == "igfiqa-study-small-cpu"
    protocol = load_study_spec(REPO / "configs" / "study" / "protocol_s.yaml")
    assert not protocol.launch.single_process and len(protocol.matchers.onnx) == 5
    # its data and models are a cluster's: reading the spec works anywhere, running it needs them
    with pytest.raises(ConfigError, match=r"protocol_s\.yaml: training_data\.dataset: /data/casia-shards"):
        check_inputs(protocol)


def test_a_run_config_pairs_the_seed_and_puts_the_arm_last(tmp_path: Path) -> None:
    from jobs.study.spec import run_config

    spec = load_study_spec(
        write(tmp_path, "seeds: [3]\noverrides: [optim.lr=0.05]\narms: {A: [optim.lr=0.02], B: []}\n")
    )
    run_a, run_b = spec.runs()
    a = run_config(
        spec, run_a, train=tmp_path, run_dir=tmp_path / "a", tracking_uri=f"sqlite:///{tmp_path}/m.db"
    )
    b = run_config(
        spec, run_b, train=tmp_path, run_dir=tmp_path / "b", tracking_uri=f"sqlite:///{tmp_path}/m.db"
    )
    assert (a.run.seed, a.data.seed, a.optim.lr, b.optim.lr) == (3, 3, 0.02, 0.05)
    assert a.run.name == "study-A-s3" and a.run.experiment == "igfiqa-study-t"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seeds: [0]\narms: {A: []}\nendpont: {}\n", r"study\.yaml: endpont: unknown key"),
        (
            "seeds: [0]\narms: {A: []}\nevaluation: {fmrs: [1e-3], discard: 0.2}\n",
            r"study\.yaml: evaluation\.discard: unknown key",
        ),
        ("seeds: [0]\narms: {A: 3}\n", r"study\.yaml: arms\.A: expected a list of strings"),
        ("seeds: [0]\narms: {A: [optim.lr=-1]}\n", r"study\.yaml: arms\.A: --set 'optim\.lr=-1': optim\.lr"),
        ("seeds: [0]\narms: {A: [optim.lrr=1]}\n", r"study\.yaml: arms\.A: --set 'optim\.lrr=1'"),
        ("seeds: [0]\narms: {'A B': []}\n", r"arms\.A B: an arm name"),
        ("seeds: [0, 0]\narms: {A: []}\n", r"seeds: \[0, 0\] lists a seed twice"),
        ("seeds: []\narms: {A: []}\n", "seeds: the study names no seed"),
        ("seeds: [0]\narms: {A: []}\narm_seeds: {B: [0]}\n", r"arm_seeds\.B: no such arm"),
        ("seeds: [0]\narms: {A: []}\narm_seeds: {A: [7]}\n", r"arm_seeds\.A: seeds \[7\] are not among"),
        (
            "seeds: [0]\narms: {A: []}\nhypotheses: [{name: h, arm: A, baseline: C}]\n",
            r"hypotheses\[0\]\.baseline: no arm 'C'",
        ),
        (
            "seeds: [0]\narms: {A: [], B: []}\nhypotheses: [{name: h, arm: A, baseline: B, endpoint: auc}]\n",
            r"hypotheses\[0\]\.endpoint",
        ),
        (
            "seeds: [0]\narms: {A: []}\nendpoint: {fmr: 0.01}\n",
            r"endpoint\.fmr: 0\.01 is not among evaluation\.fmrs",
        ),
        (
            f"seeds: [0]\narms: {{A: []}}\nmatchers: {{spec: {MATCHERS}, onnx: [a.onnx]}}\n",
            "matchers: give either spec",
        ),
        ("seeds: [0]\narms: {A: []}\nbootstrap: {draws: 10}\n", r"bootstrap\.draws must be >= 100"),
        ("seeds: [x]\narms: {A: []}\n", r"seeds\[0\]: expected an integer"),
    ],
)
def test_bad_specs_are_refused_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_study_spec(write(tmp_path, text))


def test_an_evaluation_set_of_the_training_seed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(
        f"name: t\nconfig: {BASE}\nmatchers: {{spec: {MATCHERS}}}\nseeds: [0]\narms: {{A: []}}\n"
        "training_data: {synthetic: {seed: 4}}\nevaluation: {identity_sets: [{name: u, seed: 4}]}\n"
    )
    with pytest.raises(ConfigError, match=r"identity_sets\[0\]\.seed: 4 is the training data's seed"):
        load_study_spec(path)
