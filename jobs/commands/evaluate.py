"""`igfiqa erc | eval | score | export`: quality evaluation, scoring of images and ONNX export.

Argument parsing and printing; the work is in `jobs.evaluation` (imported by the handlers, so
`igfiqa --help` stays instant). Each handler turns its flags into one
`pipeline.evaluation.options.EvalOptions` (`eval_options`) and passes that down.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.commands.common import CHECKPOINT_HELP

if TYPE_CHECKING:
    from pipeline.evaluation.options import EvalOptions

log = logging.getLogger(__name__)

DEFAULT_NONMATED_CAP = 10_000_000  # EvalOptions' default (pipeline.evaluation.all_pairs), checked by a test

# flag (argparse dest) → EvalOptions field; a command has the flags of its option groups
OPTION_FLAGS = {
    "flip": "flip",
    "batch_size": "batch_size",
    "device": "device",
    "fmr": "fmrs",
    "discard_limit": "discard_limit",
    "crfiqa_refit": "crfiqa_refit",
    "nan_quality": "nan_policy",
    "fr_model": "fr_models",
    "fr_bgr": "fr_bgr",
    "fr_embeddings": "fr_embeddings",
    "own_backbone": "own_backbone",
    "nonmated_cap": "nonmated_sample_cap",
    "nonmated_seed": "nonmated_sample_seed",
    "ground_truth": "ground_truth",
}

PAIRS_SCORES_HELP = """\
PAIRS  a CSV or parquet table, one row per comparison:
         left, right   image keys (matching SCORES' image column)
         similarity    comparison score of the face recognition model, higher = more alike
         mated         1 for a same-identity pair, 0 otherwise
SCORES a CSV or parquet table, one row per image:
         image         the image key
         <method> …    one numeric column per FIQA method (higher = better quality);
                       several columns = several methods on one plot and one table
"""

WHAT_IS_COMPUTED = """\
what is computed (see pipeline/evaluation/evaluate/quality_metrics.py for the exact definitions):
  pair quality   min of the two images' qualities
  threshold      fixed once on ALL pairs at each --fmr: a pair matches when similarity > threshold
  EDC            ISO/IEC 29794-1: mated pairs discarded lowest quality first, equal qualities together;
                 FNMR of what remains vs the discarded fraction; partial AUC up to --discard-limit
  ERC AUC        the FIQA papers' protocol (CR-FIQA, IG-FIQA Table 2): reject 0, 0.05, …, 0.95 of all
                 pairs, FNMR at the fixed threshold, trapezoidal area
  --crfiqa-refit also the published CR-FIQA script's variant, which refits the threshold at every
                 reject fraction (numbers differ from the fixed-threshold ones)
"""

OUTPUTS = """\
outputs in --out: results.json, summary.csv, curves.csv, table.md (+ table_*.csv, the paper's
Table 2 layout: methods × dataset/FMR), quality_<dataset>.png (every method's EDC and ERC per FMR).
An EDC has a point per distinct pair quality; the files and plots hold at most 1,000 of them
(the full curve sampled at evenly spaced discard fractions), the pAUC and AUC figures come
from the full curves. The random reference is the mean of 20 seeded draws.
"""


EVAL_DESCRIPTION = """\
Evaluate a trained checkpoint on every converted set under --data (--data may also be
one set's folder):
  * verification sets (`igfiqa prep bins`): their listed pairs; 10-fold verification
    accuracy (InsightFace's protocol) and EDC / ERC, as `igfiqa erc` computes them;
  * identity-labelled sets (`igfiqa prep convert` of a RecordIO dataset or an image
    folder ROOT/<identity>/*.jpg, no pairs list): ALL mated pairs and all non-mated
    pairs (a seeded hashed sample of about --nonmated-cap when there are more), so FMR
    1e-3 and 1e-4 are resolved; EDC / ERC beside the oracle (quality = -strength) when
    the set has ground truth (--ground-truth FILE, or the set's ground_truth.parquet).
The quality of every image comes from one forward pass of the model (--flip: with its
mirror image too, a secondary protocol).

Comparisons come from each matcher, one result row per set x matcher: cross-model, as
the paper evaluates (the primary protocol, docs/evaluation.md), independent face
recognition models
  --fr-model MODEL.onnx       repeatable; run with onnxruntime, named by the file stem;
                              input [N, 3, H, W] float32, (pixel - 127.5) / 127.5, RGB
                              (--fr-bgr for BGR models)
  --fr-embeddings FILE.npz    precomputed: arrays `keys` [N] ("<set>/<key>" or the
                              manifest key) and `embeddings` [N, D]
or, without them (or beside them with --own-backbone), the checkpoint's own backbone.
On verification sets the own backbone's accuracy is reported beside the FR model's.

The results go to MLflow as an "eval" run, a child of the checkpoint's training run
(experiment and tracking URI from the checkpoint's config unless --tracking-uri).

examples:
  igfiqa eval runs/tiny-cpu/checkpoints/last.ckpt --data work/val --out work/eval
  igfiqa eval runs/tiny-cpu/checkpoints/last.ckpt --data /data/idset --fr-model work/matchers/r50-arcface.onnx --fr-model work/matchers/r34-cosface.onnx --out work/eval-primary
"""

EVAL_EXTRA_OUTPUTS = """\
also: verification.csv, and per set scores_<set>.parquet and, per verification set,
pairs_<set>.parquet (pairs_<set>.<matcher>.parquet with several matchers), ready for
`igfiqa erc` (e.g. to put other FIQA methods' scores beside ours); with several matchers
the tables' columns and the plots are per "<set> (<matcher>)"
"""

SCORE_DESCRIPTION = """\
Score aligned 112×112 face images with a trained checkpoint (other sizes are resized
to 112×112 and flagged). PATHs are image files or folders, searched recursively for
.jpg/.jpeg/.png. An unreadable file stays in the output with NaN quality and its
error, is listed at the end, and does not stop the run.

Output (parquet, or CSV when --out ends in .csv), one row per file:
  image (path), quality (or --column), height, width (before resizing), resized, error
It is a SCORES table for `igfiqa erc` when the image column matches the pairs' keys.

The quality scale: the head regresses the certainty ratio CR = CCS / (NNCCS + 1 + eps) of the
training images, so scores lie mostly in [0, 1] (about 0: the face is as close to another
identity as to its own; near 1 only in theory), higher = more likely to be recognised. Only the
order matters: scores of two models, or of one model after more training, are not on one
scale; set a threshold from the scores of data you know (e.g. `igfiqa curate` percentiles), or
calibrate the model (`igfiqa calibrate`) and give its map:

--calibration calibration.json adds two columns that mean the same for every model:
  expected_fnmr   the FNMR this image is expected to have in its mated comparisons by the
                  calibration's matcher at its FMR (the map of raw quality, monotone)
  quality_score   0-100 integer, higher = better (ISO/IEC 29794-1's and OFIQ's direction):
                  round(-25 * log10(max(expected_fnmr, 1e-4))) clipped to [0, 100], i.e. 25
                  points per factor of ten in FNMR: 100 = FNMR <= 1e-4, 75 = 1e-3, 50 = 1%,
                  25 = 10%, 0 = 100%. A log scale because FNMR spans orders of magnitude:
                  100 * (1 - FNMR) would put every usable image between 95 and 100.
  The map must come from this checkpoint's weights (a map of another model is refused).
--format ofiq-csv writes OFIQ's layout instead (needs --calibration, a .csv --out):
  Filename;<column>;<column>.scalar;  then one row per image: path, raw quality (6 decimals),
  quality_score; ';'-separated as OFIQ writes it; an unreadable image has both fields empty.

example:
  igfiqa score runs/tiny-cpu/checkpoints/last.ckpt photos/ extra.jpg --out scores.parquet
  (calibrated, OFIQ's CSV: see `igfiqa calibrate --help`)
"""

EXPORT_DESCRIPTION = """\
Export the checkpoint's backbone + quality head to ONNX and check it against torch
with onnxruntime.

The ONNX model: input `images` [batch, 3, 112, 112] float32, RGB, (pixel - 127.5) / 127.5,
dynamic batch; output `quality` [batch] and, with --with-embedding, `embedding` [batch, D].
The command prints the largest absolute difference between onnxruntime and torch on
random images (batches of 1 and 3) and fails when it exceeds --tolerance.

--calibration calibration.json (of this checkpoint, `igfiqa calibrate`) stores the map in the
model's metadata_props under "igfiqa.calibration" (JSON: knots "quality" and "expected_fnmr",
linear between them, constant beyond, FMR, threshold, matcher, model fingerprint), so whoever
runs the ONNX model computes expected_fnmr and quality_score as `igfiqa score` does.

example:
  igfiqa export runs/tiny-cpu/checkpoints/last.ckpt --onnx quality.onnx --with-embedding
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the evaluation commands to the `igfiqa` parser."""
    formatter = argparse.RawDescriptionHelpFormatter

    erc = subparsers.add_parser(
        "erc",
        help="EDC/ERC of any FIQA scores on any comparison pairs",
        description="Evaluate FIQA quality scores: EDC (ISO/IEC 29794-1) and the papers' ERC AUC.\n\n"
        + PAIRS_SCORES_HELP
        + "\n"
        + WHAT_IS_COMPUTED
        + "\n"
        + OUTPUTS
        + "\nexample (the pairs and scores `igfiqa eval` wrote):\n  igfiqa erc --pairs work/eval/pairs_mixed.parquet "
        "--scores work/eval/scores_mixed.parquet --out work/erc",
        formatter_class=formatter,
    )
    erc.add_argument("--pairs", required=True, type=Path, help="comparison pairs table (CSV or parquet)")
    erc.add_argument("--scores", required=True, type=Path, help="quality scores table (CSV or parquet)")
    erc.add_argument("--out", required=True, type=Path, help="output directory (created)")
    _add_quality_options(erc)
    erc.add_argument(
        "--name", default=None, help="dataset name in tables and plots (default: the PAIRS file stem)"
    )
    erc.add_argument(
        "--methods", nargs="+", default=None, help="quality columns to evaluate (default: all numeric)"
    )
    erc.set_defaults(func=run_erc)

    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on converted verification sets",
        description=EVAL_DESCRIPTION + "\n" + OUTPUTS + EVAL_EXTRA_OUTPUTS,
        formatter_class=formatter,
    )
    evaluate.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    evaluate.add_argument(
        "--data", required=True, type=Path, help="folder of converted verification or identity-labelled sets"
    )
    evaluate.add_argument("--out", required=True, type=Path, help="output directory (created)")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument(
        "--fr-model",
        type=Path,
        action="append",
        default=None,
        help="ONNX face recognition model for the comparisons (repeatable: one matcher each)",
    )
    source.add_argument(
        "--fr-embeddings", type=Path, default=None, help=".npz of precomputed embeddings (see above)"
    )
    evaluate.add_argument("--fr-bgr", action="store_true", help="the ONNX FR models expect BGR channel order")
    evaluate.add_argument(
        "--own-backbone",
        action="store_true",
        help="beside --fr-model / --fr-embeddings, also compare with the checkpoint's own backbone",
    )
    evaluate.add_argument(
        "--nonmated-cap",
        type=int,
        default=DEFAULT_NONMATED_CAP,
        help="identity-labelled sets: at most about this many non-mated pairs, a seeded hashed sample "
        f"when there are more (default: {DEFAULT_NONMATED_CAP:,}; 0: all of them)",
    )
    evaluate.add_argument("--nonmated-seed", type=int, default=0, help="seed of that sample (default: 0)")
    evaluate.add_argument(
        "--ground-truth",
        type=Path,
        default=None,
        help="identity-labelled sets: table (parquet/CSV) of strength per image, matched by path, key or "
        "record, for the oracle quality -strength (default: the set's ground_truth.parquet, if any)",
    )
    evaluate.add_argument(
        "--name", default=None, help="method name in tables and plots (default: the run name)"
    )
    evaluate.add_argument(
        "--flip",
        action="store_true",
        help="embedding = embedding(image) + embedding(mirror); quality = the mean of both",
    )
    _add_inference_options(evaluate)
    _add_quality_options(evaluate)
    evaluate.add_argument(
        "--tracking-uri", default="", help="MLflow tracking URI (default: the run's, or sqlite)"
    )
    evaluate.add_argument("--no-track", action="store_true", help="do not log this evaluation to MLflow")
    evaluate.set_defaults(func=run_eval)

    score = subparsers.add_parser(
        "score",
        help="quality score of every face image under some paths",
        description=SCORE_DESCRIPTION,
        formatter_class=formatter,
    )
    score.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    score.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    score.add_argument("--out", required=True, type=Path, help="output table (.parquet or .csv)")
    score.add_argument("--column", default="quality", help="name of the quality column (default: quality)")
    score.add_argument("--embeddings", type=Path, default=None, help="also write the embeddings to this .npz")
    score.add_argument(
        "--flip", action="store_true", help="add the mirror image's embedding, average the two qualities"
    )
    score.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    score.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="calibration.json",
        help="add expected_fnmr and the 0-100 quality_score (see above)",
    )
    score.add_argument(
        "--format",
        choices=("table", "ofiq-csv"),
        default="table",
        help="table: parquet or CSV by --out's suffix (default); ofiq-csv: OFIQ's layout",
    )
    _add_inference_options(score)
    score.set_defaults(func=run_score)

    export = subparsers.add_parser(
        "export",
        help="export backbone + quality head to ONNX (checked with onnxruntime)",
        description=EXPORT_DESCRIPTION,
        formatter_class=formatter,
    )
    export.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    export.add_argument("--onnx", required=True, type=Path, help="output .onnx file")
    export.add_argument("--with-embedding", action="store_true", help="also output the embedding")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    export.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="torch exporter: dynamo (torch.export), torchscript (legacy) or auto (dynamo, then torchscript)",
    )
    export.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest allowed |onnx - torch| (default: 1e-3)"
    )
    export.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="calibration.json",
        help="store this checkpoint's calibration map in the model's metadata",
    )
    export.set_defaults(func=run_export)


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_quality_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fmr",
        nargs="+",
        type=float,
        default=None,
        help="target FMRs (default: the paper's 1e-3 1e-4 where the pairs resolve them, FMR x non-mated "
        ">= 10, else the smallest FMR they resolve)",
    )
    parser.add_argument(
        "--discard-limit",
        type=float,
        default=0.2,
        help="EDC partial AUC from 0 up to this discarded fraction (default: 0.2)",
    )
    parser.add_argument(
        "--crfiqa-refit",
        action="store_true",
        help="also report the published CR-FIQA script's ERC AUC (threshold refit at every reject fraction)",
    )
    parser.add_argument(
        "--nan-quality",
        choices=("error", "lowest"),
        default="error",
        help="a NaN quality score: stop with an error (default) or treat it as the lowest quality",
    )


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The command's one EvalOptions: the fields of the flags it has, EvalOptions' defaults for the rest."""
    from pipeline.evaluation.options import EvalOptions

    flags = vars(args)
    fields: dict[str, Any] = {field: flags[flag] for flag, field in OPTION_FLAGS.items() if flag in flags}
    if "no_progress" in flags:
        fields["progress"] = not flags["no_progress"]
    return EvalOptions(**fields)


def run_erc(args: argparse.Namespace) -> int:
    """Handler of `igfiqa erc`."""
    from jobs.evaluation import evaluate_score_tables

    files, evaluation = evaluate_score_tables(
        args.pairs, args.scores, args.out, eval_options(args), name=args.name, methods=args.methods
    )
    _print_outcome(files, [evaluation])
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `igfiqa eval`."""
    from jobs.evaluation import evaluate_checkpoint_file, log_evaluation

    evaluated = evaluate_checkpoint_file(
        args.checkpoint, args.data, args.out, eval_options(args), name=args.name
    )
    _print_outcome(evaluated.outcome.files, evaluated.outcome.evaluations)
    if not args.no_track:
        run_id = log_evaluation(evaluated, tracking_uri=args.tracking_uri)
        train_run_id = evaluated.train_run_id
        if run_id:
            print(
                f"MLflow run: {run_id}" + (f" (child of training run {train_run_id})" if train_run_id else "")
            )
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Handler of `igfiqa score`."""
    from jobs.evaluation import score_images

    scored = score_images(
        args.checkpoint,
        args.paths,
        args.out,
        eval_options(args),
        column=args.column,
        embeddings=args.embeddings,
        workers=args.workers,
        calibration=args.calibration,
        output_format=args.format,
    )
    table, failed = scored.table, scored.failed
    if scored.embeddings_written:
        print(f"embeddings: {args.embeddings}")
    print(f"scored {len(table) - len(failed)} of {len(table)} images → {args.out}")
    resized = int(table["resized"].sum())
    if resized:
        print(f"{resized} image(s) were not 112×112 and were resized (column resized)")
    if len(failed):
        print(f"{len(failed)} unreadable file(s), kept in the output with their error:")
        for _, row in failed.head(20).iterrows():
            print(f"  {row['error']}")
        if len(failed) > 20:
            print(f"  … and {len(failed) - 20} more")
    return 0 if len(failed) < len(table) else 1


def run_export(args: argparse.Namespace) -> int:
    """Handler of `igfiqa export`."""
    from jobs.evaluation import export_checked_onnx

    report = export_checked_onnx(
        args.checkpoint,
        args.onnx,
        with_embedding=args.with_embedding,
        opset=args.opset,
        exporter=args.exporter,
        tolerance=args.tolerance,
        calibration=args.calibration,
    )
    print(f"exported {args.onnx} ({report.exporter} exporter, opset {args.opset}, dynamic batch)")
    print(
        f"onnxruntime vs torch, batches {report.batch_sizes}: max |diff| quality {report.max_abs_diff_quality:.3g}"
    )
    if report.max_abs_diff_embedding is not None:
        print(f"onnxruntime vs torch: max |diff| embedding {report.max_abs_diff_embedding:.3g}")
    if args.calibration is not None:
        print(f"calibration map of {args.calibration} stored in the metadata (igfiqa.calibration)")
    return 0


def _print_outcome(files: Any, evaluations: list[Any]) -> None:
    for evaluation in evaluations:
        for warning in evaluation.warnings:
            log.warning(warning)
    print(files.table_md.read_text())
    print(f"table: {files.table_md}")
    for png in files.pngs:
        print(f"plot:  {png}")
    print(f"all results: {files.json}")
