"""`igfiqa curate score | filter`: score a converted dataset, write a quality-filtered copy of it.

Argument parsing and printing; the stages and their MLflow runs are `jobs.stages.curate`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.commands.common import (
    CHECKPOINT_HELP,
    add_stage_tracking_options,
    add_wait_lock_option,
    stage_tracking_uri,
)

CURATE_DESCRIPTION = """\
Clean a training set with a quality model: score every image, then keep images by a rule.

  igfiqa curate score runs/tiny-cpu/checkpoints/last.ckpt --data work/train --out work/quality
  igfiqa curate filter work/train --quality work/quality/quality.parquet --out work/train-q80 --rule lowest:20% --min-per-identity 2
  igfiqa prep inspect work/train-q80          # shows where it came from
  igfiqa train configs/tiny_cpu.yaml --set data.dataset=work/train-q80 --set run.dir=runs/curated

Both log an MLflow run (experiments igfiqa-curate-score and igfiqa-curate) with the lineage:
the datasets' fingerprints, the model's fingerprint, checkpoint and training run, the rule.
"""

SCORE_DESCRIPTION = """\
The quality of every image of a converted dataset (`prep convert` or a set from `prep bins`),
through the DALI decoder the training loader uses (decode and normalise, no augmentation;
the GPU decoder on a GPU) and the checkpoint's model.

Writes OUT/quality.parquet, one row per manifest row and in manifest order: key, record,
label, quality (float32, higher = better); its metadata holds the scored dataset's
fingerprint, the model's fingerprint (SHA-256 of its weights), the checkpoint and its
training run. Resumable per shard: OUT/.score/ holds each finished shard's scores, so a
killed run redone scores only what is missing and ends identical. OUT holding the scores of
another dataset, model or batch size is refused.

With --calibration calibration.json (`igfiqa calibrate` of this checkpoint; a map of other
weights is refused before scoring) the file also gets expected_fnmr (float32) and the 0-100
quality_score (int16), what the rules expected-fnmr-above and score-below of `curate filter`
read, and the calibration's SHA-256, FMR and matcher in its metadata.

With --submit PROFILE every range of --shards-per-task shards is one task of a SLURM array
(one GPU per task when the profile has GPUs); the quality file is written here at the end.

example:
  igfiqa curate score runs/tiny-cpu/checkpoints/last.ckpt --data work/train --out work/quality-slurm --submit slurm/clusters/local.yaml --shards-per-task 4
"""

FILTER_DESCRIPTION = """\
Write a new converted dataset holding the images of DATASET that a rule keeps.

Rules (--rule), on the scores of --quality (written by `curate score` for this very dataset:
a file of another dataset, with missing rows or NaN scores is refused):
  lowest:F               drop the lowest fraction F of all images (lowest:0.2 or lowest:20%)
  lowest-per-identity:F  drop the lowest fraction F of every identity's images
  below:T                drop every image with quality below T
and on a quality file scored with --calibration (a meaning instead of a model's raw scale):
  expected-fnmr-above:P  drop every image whose expected FNMR is above P (0.05 or 5%)
  score-below:S          drop every image whose 0-100 quality_score is below S
                         (score-below:40 = expected FNMR above 10^(-40/25), about 2.5%)
A calibrated rule on a file scored without --calibration is refused, naming the rule.
Ties go in manifest order. Then every identity must keep --min-per-identity K images:
one left with fewer is removed (--below-min drop, the default) or gets back its best
images up to K (--below-min restore). Kept identities are renumbered 0..C'-1.

OUT gets the same format `prep convert` writes (training reads it as it is): shards
(the kept images' bytes, in the source's shuffled order), manifest.parquet,
classes.parquet, class_map.parquet (label, source_label, source_count, count),
removed.parquet (key, record, source_label, quality, reason), dataset.json LAST with
the lineage (`prep inspect OUT` shows it), and report/: quality_histogram.png,
quality_deciles.png (sample images per decile, lowest first), curation_removed.png.
OUT must not exist (or be empty); a killed run is resumed by the same command.
A rule that keeps no image writes nothing.

With --submit PROFILE the plan is made here, every range of --shards-per-task output
shards is one task of a SLURM array, and the tables and dataset.json are written here
at the end: the same bytes as a run here. Re-running the command submits only the
shards still missing.

example:
  igfiqa curate filter work/train --quality work/quality/quality.parquet --out work/train-q80-slurm --rule lowest:20% --submit slurm/clusters/local.yaml --shards-per-task 4
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `igfiqa curate ...` to the top-level parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    curate = subparsers.add_parser(
        "curate",
        help="score a converted dataset and write a quality-filtered copy",
        description=CURATE_DESCRIPTION,
        formatter_class=fmt,
    )
    sub = curate.add_subparsers(dest="curate_command", metavar="STAGE", required=True)

    score = sub.add_parser(
        "score", help="quality of every image", description=SCORE_DESCRIPTION, formatter_class=fmt
    )
    score.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    score.add_argument("--data", type=Path, required=True, metavar="DATASET", help="converted dataset folder")
    score.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output folder (quality.parquet)"
    )
    score.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    score.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images per batch (default: 256)"
    )
    score.add_argument(
        "--threads", type=int, default=2, metavar="N", help="DALI decoding threads (default: 2)"
    )
    score.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="calibration.json",
        help="add expected_fnmr and quality_score (a calibration of this checkpoint, `igfiqa calibrate`)",
    )
    score.add_argument(
        "--submit",
        metavar="PROFILE",
        help="run as a SLURM array on this cluster profile (e.g. slurm/clusters/local.yaml)",
    )
    score.add_argument(
        "--shards-per-task",
        type=int,
        default=1,
        metavar="N",
        help="with --submit: shards per array task (default: 1)",
    )
    _add_common_options(score)
    score.set_defaults(func=_run_score)

    filt = sub.add_parser(
        "filter",
        help="a quality-filtered copy of a dataset",
        description=FILTER_DESCRIPTION,
        formatter_class=fmt,
    )
    filt.add_argument("dataset", type=Path, metavar="DATASET", help="converted training dataset folder")
    filt.add_argument("--quality", type=Path, required=True, help="quality.parquet of `curate score`")
    filt.add_argument("--out", type=Path, required=True, metavar="NEW", help="new dataset folder")
    filt.add_argument(
        "--rule",
        required=True,
        help="lowest:F | lowest-per-identity:F | below:T | expected-fnmr-above:P | score-below:S (see above)",
    )
    filt.add_argument(
        "--min-per-identity",
        type=int,
        default=1,
        metavar="K",
        help="images every kept identity keeps (default: 1)",
    )
    filt.add_argument(
        "--below-min",
        choices=("drop", "restore"),
        default="drop",
        help="an identity left with fewer than K: drop it (default) or give back its best images",
    )
    filt.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        metavar="N",
        help="images per shard (default: the source's)",
    )
    filt.add_argument(
        "--report", type=Path, default=None, metavar="DIR", help="report PNGs here (default: NEW/report)"
    )
    filt.add_argument(
        "--submit",
        metavar="PROFILE",
        help="write the shards as a SLURM array on this cluster profile (e.g. slurm/clusters/local.yaml)",
    )
    filt.add_argument(
        "--shards-per-task",
        type=int,
        default=1,
        metavar="N",
        help="with --submit: output shards per array task (default: 1)",
    )
    filt.add_argument("--no-report", action="store_true", help="do not draw the report PNGs")
    _add_common_options(filt)
    filt.set_defaults(func=_run_filter)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    add_wait_lock_option(parser, "another run writes into the output folder")
    add_stage_tracking_options(parser)


def _run_score(args: argparse.Namespace) -> int:
    from jobs.errors import UserError
    from jobs.stages.curate import run_score

    if args.batch_size < 1 or args.threads < 1:
        raise UserError("--batch-size and --threads must be >= 1")
    try:
        outcome = run_score(
            args.checkpoint,
            args.data,
            args.out,
            cluster=args.submit,
            shards_per_task=args.shards_per_task,
            device=args.device,
            batch_size=args.batch_size,
            num_threads=args.threads,
            tracking_uri=stage_tracking_uri(args),
            wait_lock=args.wait_lock,
            calibration=args.calibration,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: finished shards are kept; run the same command again to resume {args.out}",
            file=sys.stderr,
        )
        return 130
    scored = outcome.scored
    where = f" (SLURM array job {outcome.array_job_id})" if outcome.array_job_id else ""
    q = scored.quality
    if scored.scored_now == scored.plan.num_images:
        how = f"in {outcome.seconds:.1f} s ({outcome.images_per_s:.0f} images/s)"
    elif scored.scored_now:
        how = f"({scored.scored_now} now, the rest by an earlier run; {outcome.images_per_s:.0f} images/s)"
    else:
        how = "(all by an earlier run)"
    print(
        f"scored {scored.plan.num_images} images{where} {how}: quality {q.min():.4g} … {q.max():.4g}, "
        f"median {float(_median(q)):.4g} -> {scored.path}"
    )
    if outcome.mlflow_run_id:
        print(f"MLflow run: {outcome.mlflow_run_id} (experiment igfiqa-curate-score)")
    return 0


def _median(values) -> float:
    import numpy as np

    return float(np.nanmedian(values)) if len(values) else float("nan")


def _run_filter(args: argparse.Namespace) -> int:
    from data_prep.curate import Rule
    from jobs.stages.curate import run_filter

    rule = Rule.parse(args.rule, min_per_identity=args.min_per_identity, below_min=args.below_min)
    try:
        outcome = run_filter(
            args.dataset,
            args.quality,
            args.out,
            rule,
            cluster=args.submit,
            shards_per_task=args.shards_per_task,
            samples_per_shard=args.samples_per_shard,
            report_dir=args.report,
            report=not args.no_report,
            tracking_uri=stage_tracking_uri(args),
            wait_lock=args.wait_lock,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: written shards are kept; run the same command again to finish {args.out}",
            file=sys.stderr,
        )
        return 130
    info = outcome.info
    c = info.curation or {}
    where = f" (SLURM array job {outcome.array_job_id})" if outcome.array_job_id else ""
    print(
        f"kept {info.num_images} of {c.get('source_images')} images and {info.num_classes} of "
        f"{c.get('source_classes')} identities ({rule.describe()}){where}: {info.root}"
    )
    print(
        f"removed {c.get('removed_images')} images ({c.get('removed_by_rule')} by the rule, "
        f"{c.get('removed_with_identity')} with their identity) and {c.get('removed_classes')} identities"
    )
    if outcome.report is not None:
        print(f"report: {', '.join(str(p) for p in outcome.report.all_files())}")
    if outcome.mlflow_run_id:
        print(f"MLflow run: {outcome.mlflow_run_id} (experiment igfiqa-curate)")
    return 0
