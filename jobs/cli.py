"""`igfiqa`: the one command line of the project.

Each command group lives in its own module under `jobs/commands/` and exposes
`register(subparsers)`; heavy imports (torch, DALI, mlflow) happen inside the
handlers so `igfiqa --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from jobs.errors import UserError

# (module under jobs.commands, in the order --help lists them)
COMMAND_MODULES = (
    "prep",
    "data",
    "train",
    "evaluate",
    "calibrate",
    "curate",
    "matchers",
    "study",
    "demo",
    "jobs_admin",
)

DESCRIPTION = """\
IG-FIQA: train and evaluate face image quality assessment models.

typical flow (each line runs as written from the repository root, in this order; README
"Preparing real datasets" does the same with InsightFace's data):
  igfiqa prep synth --out work/synth --identities 40
  igfiqa prep convert work/synth --out work/train
  igfiqa prep bins work/synth/clean.bin work/synth/mixed.bin --out work/val
  igfiqa train configs/tiny_cpu.yaml --set data.dataset=work/train --set optim.max_steps=20
  igfiqa eval runs/tiny-cpu/checkpoints/last.ckpt --data work/val --out work/eval
  igfiqa submit configs/tiny_cpu.yaml --cluster slurm/clusters/local.yaml --set data.dataset=work/train --wait
  igfiqa curate score runs/tiny-cpu/checkpoints/last.ckpt --data work/train --out work/quality
  igfiqa curate filter work/train --quality work/quality/quality.parquet --out work/train-curated --rule lowest:0.2
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command group."""
    parser = argparse.ArgumentParser(
        prog="igfiqa", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"jobs.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `igfiqa` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _is_user_error(exc):
            print(f"igfiqa: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


def _is_user_error(exc: Exception) -> bool:
    """Errors that carry a complete message for the user (bad input, bad config, a bad checkpoint)."""
    from data_prep.errors import DataError
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError

    return isinstance(exc, UserError | ConfigError | FileNotFoundError | DataError | CheckpointError)


if __name__ == "__main__":
    sys.exit(main())
