"""A tiny converted dataset and tiny training configs, shared by the training tests.

`tiny_dataset(root)` synthesizes and converts 40 identities × 6 images (about 1 s,
cached per folder); `tiny_config(...)` gives a deterministic CPU config of the
small backbone that trains a step in well under a second on one core;
`new_mlflow_store(template, folder)` puts an empty MLflow store where a run logs;
`tiny_matcher(folder)` builds one small reference matcher (`jobs.stages.matchers`) from a spec
of `TINY_MATCHER_SPEC`'s schema (that of configs/matchers/synthetic.yaml).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from data_prep.convert import convert
from data_prep.synth import synthesize
from pipeline.config import TrainConfig, config_from_dict

# what pipeline.training.monitor logs every run.log_every steps
STEP_METRICS = {
    "loss_arc",
    "loss_ig",
    "loss_total",
    "cr_mean",
    "quality_mean",
    "sample_weight_mean",
    "fr_ccs_mean",
    "alpha",
    "images_per_s",
    "data_wait_frac",
    "seconds_per_step",
    "class_weight_mean",
    "class_weight_zero_frac",
    "class_weight_p10",
    "class_weight_p50",
    "class_weight_p90",
    "variance_mean",
    "variance_std",
    "lr",
    "epoch",
}
TINY_IDENTITIES = 40
TINY_IMAGES_PER_IDENTITY = 6


def tiny_dataset(root: Path) -> Path:
    """ROOT/train: the converted tiny synthetic dataset (made once; ROOT/synth holds the source)."""
    train = root / "train"
    if (train / "dataset.json").is_file():
        return train
    synth = root / "synth"
    synthesize(synth, identities=TINY_IDENTITIES, images_per_identity=TINY_IMAGES_PER_IDENTITY, seed=0)
    convert(synth, train, samples_per_shard=100, progress=False)
    return train


def new_mlflow_store(template: Path, folder: Path) -> str:
    """FOLDER/mlflow.db as a copy of `template` (the session's `mlflow_store_template`); its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def tiny_config(dataset: Path, run_dir: Path, tracking_uri: str, **sections: dict[str, Any]) -> TrainConfig:
    """Deterministic CPU config of iresnet_mini on `dataset`; `sections` override fields per section.

    Where mlflow is not installed (a lent GPU machine carries only what its tests need) tracking
    is "off".
    """
    if importlib.util.find_spec("mlflow") is None:
        tracking_uri = "off"
    tree: dict[str, dict[str, Any]] = {
        "data": {"dataset": str(dataset), "fr_batch": 8, "reg_batch": 8, "num_threads": 1, "prefetch": 1},
        # a drawn quality head: with the default zero head loss_ig starts near 0 (quality 0, CR ~0)
        # and rises with CR, so "the losses fall" would not describe a short run
        "model": {"backbone": "iresnet_mini", "embedding_size": 32, "head_init": "uniform"},
        "optim": {"epochs": 2, "milestones": [1], "lr": 0.05},
        "run": {
            "name": "tiny-test",
            "dir": str(run_dir),
            "device": "cpu",
            "deterministic": True,
            "log_every": 2,
            "checkpoint_every_steps": 4,
            "checkpoint_every_minutes": 0.0,
            "keep_checkpoints": 10,
            "tracking_uri": tracking_uri,
            "experiment": "tests",
        },
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config_from_dict(tree)


TINY_MATCHER = "tiny-cos"
REPO = Path(__file__).resolve().parents[1]
# configs/matchers/synthetic.yaml's schema, small: 64 identities x 8 images for 8 epochs = 128 steps of
# 32 images, the least tried that verifies anything at FMR 1e-3 on the demo test's 50 x 10 set
# (FNMR 0.79; 24 steps on 24 identities gave FNMR 1, every pair failing)
TINY_MATCHER_SPEC = f"""
data: {{identities: IDENTITIES, images_per_identity: 8, seed: 2000000}}
evaluation: {{seed: 1000000, pairs: 40, identities: 12}}
matchers:
  - name: {TINY_MATCHER}
    config: {REPO / "configs" / "tiny_cpu.yaml"}
    seed: 1
    overrides: [data.fr_batch=32, optim.epochs=EPOCHS, "optim.milestones=[MILESTONE]", run.log_every=10,
                run.checkpoint_every_steps=0, model.embedding_size=32]
"""


def tiny_matcher(folder: Path, identities: int = 64, epochs: int = 8) -> tuple[Path, Path]:
    """(FOLDER/matchers.yaml, FOLDER/out): the spec of `TINY_MATCHER` and the folder it is built in
    (here, one process); reused when built before."""
    from jobs.stages.matcher_spec import load_matchers_spec
    from jobs.stages.matchers import MatcherLaunch, build_matchers

    spec = folder / "matchers.yaml"
    text = TINY_MATCHER_SPEC.replace("IDENTITIES", str(identities)).replace("EPOCHS", str(epochs))
    spec.write_text(text.replace("MILESTONE", str(max(1, epochs * 3 // 4))))
    out = folder / "out"
    build_matchers(load_matchers_spec(spec), out, launch=MatcherLaunch(nproc=1), say=lambda _: None)
    return spec, out
