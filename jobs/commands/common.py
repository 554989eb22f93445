"""Options and helpers that several `igfiqa` commands share, written once.

`--wait-lock` (wait for another run's output lock), `--tracking-uri` / `--no-track` (MLflow of a
data stage), the usage of a command group called without a subcommand, and the progress line.
"""

from __future__ import annotations

import argparse
import math

# the positional CHECKPOINT of eval, score, export and curate score
CHECKPOINT_HELP = (
    "a training checkpoint (.ckpt; its .infer.pt beside it is read instead when it belongs to it) "
    "or an inference file (.infer.pt: model and config only)"
)


def add_wait_lock_option(parser: argparse.ArgumentParser, writer: str) -> None:
    """`--wait-lock [SECONDS]`: wait for `writer` (who else may be writing the output) instead of refusing."""
    parser.add_argument(
        "--wait-lock",
        type=float,
        nargs="?",
        const=math.inf,
        default=0.0,
        metavar="SECONDS",
        help=f"if {writer}, wait for it (SECONDS at most) instead of refusing",
    )


def add_stage_tracking_options(parser: argparse.ArgumentParser) -> None:
    """`--tracking-uri URI` and `--no-track` of a data stage (read back with `stage_tracking_uri`)."""
    parser.add_argument(
        "--tracking-uri",
        default="",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    parser.add_argument("--no-track", action="store_true", help="do not log this stage to MLflow")


def stage_tracking_uri(args: argparse.Namespace) -> str | None:
    """The MLflow store the stage logs to ("" = the default store); None with --no-track."""
    return None if args.no_track else args.tracking_uri


def print_usage(parser: argparse.ArgumentParser) -> int:
    """What a command group does when called without a subcommand: its help, exit status 2."""
    parser.print_help()
    return 2


def say(text: str) -> None:
    """A progress line (stdout, flushed so it interleaves with a job's log)."""
    print(text, flush=True)
