"""`igfiqa erc | eval | score | export`: quality evaluation, scoring of images and ONNX export.

The handlers import torch, onnxruntime and matplotlib lazily so `igfiqa --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
what is computed (see pipeline/quality_eval.py for the exact definitions):
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
Table 2 layout: methods × dataset/FMR), quality_<dataset>.png (every method's EDC and ERC per FMR)
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
        + "\nexample:\n  igfiqa erc --pairs lfw_pairs.csv --scores lfw_scores.parquet --out work/erc --fmr 1e-3 1e-4",
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


def _add_quality_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fmr", nargs="+", type=float, default=[1e-3, 1e-4], help="target FMRs (default: 1e-3 1e-4)"
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


def read_table(path: Path) -> Any:
    """A pandas DataFrame from a CSV/TSV or parquet file."""
    import pandas as pd

    from jobs.cli import UserError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot read the table: {exc}") from exc
    raise UserError(f"{path}: unknown table format {suffix!r} (use .csv, .tsv or .parquet)")


def run_erc(args: argparse.Namespace) -> int:
    """Handler of `igfiqa erc`."""
    from pipeline.eval_report import write_report
    from pipeline.quality_eval import evaluate_quality

    pairs = read_table(args.pairs)
    scores = read_table(args.scores)
    with _user_errors():
        evaluation = evaluate_quality(
            pairs,
            scores,
            dataset=args.name or args.pairs.stem,
            methods=args.methods,
            fmrs=args.fmr,
            discard_limit=args.discard_limit,
            crfiqa_refit=args.crfiqa_refit,
            nan_policy=args.nan_quality,
            pairs_source=str(args.pairs),
            scores_source=str(args.scores),
        )
    files = write_report(
        [evaluation],
        args.out,
        metadata={"command": "erc", "pairs": str(args.pairs), "scores": str(args.scores)},
    )
    _print_outcome(files, [evaluation])
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


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the evaluation's input errors into `UserError` (one clear line, exit status 2)."""
    from jobs.cli import UserError
    from pipeline.quality_eval import QualityEvalError
    from pipeline.verification import EmbeddingError

    try:
        yield
    except (QualityEvalError, EmbeddingError) as exc:
        raise UserError(str(exc)) from exc
