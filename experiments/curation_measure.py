"""Does curation with our quality model remove the bad images, and does training on what is left work?

    .venv/bin/python -m experiments.curation_measure --demo work/demo --out work/curation [--rule lowest:20%]

On the output of `igfiqa demo` (synth/ with its ground truth, train/, val/, run/ with the trained
model), with the synthetic ground truth (synth/ground_truth.parquet: each record's degradation
and strength):

1. scores the training set with the demo's checkpoint (`igfiqa curate score`),
2. filters it by the rule (`igfiqa curate filter`, default "drop the lowest 20 %"), with the
   report's decile grid captioned by each image's true degradation,
3. measures: the share of degraded images among those the rule removed against its base rate
   in the whole set, the same per quality decile (the lowest decile first), per degradation
   kind the share removed, and Spearman's rho between quality and degradation strength,
4. trains configs/tiny_cpu.yaml on the curated set for as many steps as the demo's full-set
   training ran (the config as it is but data.dataset, the epochs that fit those steps and the
   LR milestone moved to the same step), evaluates both checkpoints on val/ the same way and
   reports their verification accuracy side by side (--skip-training leaves this out).

Every stage is reused when its output exists, so a rerun after a better recipe (a new demo
folder) is one command. Writes OUT/measurements.json; its JSON is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.curate import REMOVED_BY_RULE, CurationPlan, Rule, plan_curation
from data_prep.dataset import DATASET_FILE, load_dataset_info

log = logging.getLogger("experiments.curation_measure")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def ground_truth(synth: Path, plan: CurationPlan) -> pd.DataFrame:
    """Per source manifest row: quality, removed (by the rule), degradation, strength, degraded."""
    truth = pd.read_parquet(synth / "ground_truth.parquet")
    rows = pd.DataFrame(
        {
            "record": plan.manifest["record"].to_numpy(),
            "quality": plan.quality,
            "removed": plan.selection.reason == REMOVED_BY_RULE,
        }
    )
    joined = rows.merge(
        truth[["record", "degradation", "strength"]], on="record", how="left", validate="one_to_one"
    )
    if joined["degradation"].isna().any():
        raise ValueError(f"{synth}/ground_truth.parquet lacks records of the training set")
    joined["degraded"] = joined["degradation"] != "none"
    return joined


def degradation_measures(joined: pd.DataFrame) -> dict[str, Any]:
    """Shares of degraded images: base rate, among the removed, per quality decile; per kind removed."""
    from scipy.stats import spearmanr

    order = np.lexsort((np.arange(len(joined)), joined["quality"].to_numpy()))
    deciles = np.array_split(order, 10)
    removed = joined["removed"].to_numpy()
    base = float(joined["degraded"].mean())
    in_removed = float(joined["degraded"][removed].mean()) if removed.any() else math.nan
    rho = spearmanr(joined["quality"], joined["strength"]).statistic
    per_kind = (
        joined.groupby("degradation")
        .agg(images=("removed", "size"), removed_share=("removed", "mean"), mean_quality=("quality", "mean"))
        .round(4)
        .to_dict(orient="index")
    )
    return {
        "images": len(joined),
        "removed_images": int(removed.sum()),
        "degraded_base_rate": round(base, 4),
        "degraded_share_of_removed": round(in_removed, 4),
        "removed_enrichment": round(in_removed / base, 3) if base else math.nan,
        "degraded_share_per_decile_lowest_first": [
            round(float(joined["degraded"].to_numpy()[d].mean()), 4) for d in deciles
        ],
        "spearman_quality_vs_strength": round(float(rho), 4),
        "per_degradation": per_kind,
    }


def _final_step(run_dir: Path) -> int:
    from pipeline.checkpoint import training_lineage

    last = run_dir / "checkpoints" / "last.ckpt"
    return training_lineage(last)[1] if last.is_file() else -1


def train_curated(
    curated: Path, full_run: Path, run_dir: Path, *, nproc: int, tracking_uri: str
) -> dict[str, Any]:
    """tiny_cpu.yaml on the curated set for the full run's number of steps; what was changed and why."""
    from jobs.stages.train import train_here
    from pipeline.config import BatchLayout, load_config

    full_steps = _final_step(full_run)
    if full_steps <= 0:
        raise SystemExit(f"{full_run}: no trained checkpoint to compare with (run `igfiqa demo` first)")
    base = load_config(CONFIG, [])
    full_spe = full_steps // base.optim.epochs  # the demo trains the config's epochs
    curated_spe = BatchLayout.of(base.data, 1, load_dataset_info(curated).num_images).steps_per_epoch
    epochs = math.ceil(full_steps / curated_spe)
    milestones = [max(1, round(m * full_spe / curated_spe)) for m in base.optim.milestones]
    overrides = [
        f"data.dataset={curated}",
        f"run.dir={run_dir}",
        f"run.tracking_uri={tracking_uri}",
        f"optim.epochs={epochs}",
        f"optim.milestones=[{','.join(map(str, milestones))}]",
        f"optim.max_steps={full_steps}",
        "run.name=tiny-cpu-curated",
    ]
    if _final_step(run_dir) != full_steps:
        train_here(load_config(CONFIG, overrides), nproc, label="curation measurement")
    return {
        "steps": full_steps,
        "overrides": overrides[3:6],
        "lr_drop_step_full": [m * full_spe for m in base.optim.milestones],
        "lr_drop_step_curated": [m * curated_spe for m in milestones],
        "steps_per_epoch_full": full_spe,
        "steps_per_epoch_curated": curated_spe,
    }


def verification(checkpoint: Path, val: Path, out: Path) -> dict[str, Any]:
    """Verification accuracy (own backbone, 10-fold) per set of val/, evaluated as `igfiqa eval` does."""
    from jobs.evaluation import evaluate_checkpoint_file
    from pipeline.evaluation.options import EvalOptions

    evaluated = evaluate_checkpoint_file(checkpoint, val, out, EvalOptions(progress=False))
    return {
        s.name: {
            "accuracy": round(float(s.verification.accuracy), 4),
            "std": round(float(s.verification.accuracy_std), 4),
            "pairs": s.verification.num_pairs,
        }
        for s in evaluated.outcome.sets
    }


def _small_png(source: Path, target: Path, colours: int = 128) -> None:
    """`source` with a palette of `colours` (a fifth of the bytes, for the README)."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        palette = image.convert("RGB").quantize(colors=colours, dither=Image.Dither.NONE)
        palette.save(target, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", type=Path, required=True, help="the output folder of `igfiqa demo`")
    parser.add_argument("--out", type=Path, required=True, help="where the quality, curated set and runs go")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="scoring model (default: DEMO/run/.../last.ckpt)"
    )
    parser.add_argument("--rule", default="lowest:20%", help="curation rule (default: lowest:20%%)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default: 2, as the demo)")
    parser.add_argument("--skip-training", action="store_true", help="only the degradation measures")
    parser.add_argument(
        "--grid", type=Path, default=None, help="also write the captioned decile grid here (128 colours)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    from jobs.stages.curate import run_filter, run_score

    demo, out = args.demo.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    checkpoint = args.checkpoint or demo / "run" / "checkpoints" / "last.ckpt"
    scored = run_score(checkpoint, demo / "train", out / "quality", tracking_uri=tracking_uri, progress=True)
    quality = scored.scored.path
    rule = Rule.parse(args.rule)
    truth = pd.read_parquet(demo / "synth" / "ground_truth.parquet")
    captions = {
        int(r): ("clean" if d == "none" else f"{d} {s:.1f}")
        for r, d, s in zip(truth["record"], truth["degradation"], truth["strength"])
    }
    curated = out / "curated"
    if (curated / DATASET_FILE).is_file():
        plan = plan_curation(demo / "train", quality, rule)
    else:
        outcome = run_filter(
            demo / "train", quality, curated, rule, captions=captions, tracking_uri=tracking_uri
        )
        plan = plan_curation(demo / "train", quality, rule)
        log.info("report: %s", outcome.report)
    if args.grid is not None:
        _small_png(curated / "report" / "quality_deciles.png", args.grid)
    measures: dict[str, Any] = {
        "rule": rule.describe(),
        "checkpoint": str(checkpoint),
        # None when the scores came from an earlier run of this script
        "scoring_images_per_s": round(scored.images_per_s, 1) if math.isfinite(scored.images_per_s) else None,
        **degradation_measures(ground_truth(demo / "synth", plan)),
    }
    if not args.skip_training:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        training = train_curated(
            curated, demo / "run", out / "run-curated", nproc=args.nproc, tracking_uri=tracking_uri
        )
        full = verification(demo / "run" / "checkpoints" / "last.ckpt", demo / "val", out / "eval-full")
        cur = verification(
            out / "run-curated" / "checkpoints" / "last.ckpt", demo / "val", out / "eval-curated"
        )
        measures["training"] = {
            **training,
            "full_images": plan.source.num_images,
            "curated_images": plan.num_images,
            "verification_full": full,
            "verification_curated": cur,
        }
    (out / "measurements.json").write_text(json.dumps(measures, indent=2) + "\n")
    print(json.dumps(measures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
