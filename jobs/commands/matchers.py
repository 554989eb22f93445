"""`igfiqa matchers build | list`: the reference matchers, independent FR models kept as ONNX files.

Argument parsing and printing; building is `jobs.stages.matchers`, the spec `jobs.stages.matcher_spec`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.commands.common import print_usage, say
from jobs.stages.matcher_spec import DEFAULT_SPEC
from jobs.stages.matchers import DEFAULT_OUT, MATCHERS_FILE

GROUP_HELP = """\
Reference matchers: face recognition models trained apart from every FIQA model, kept as ONNX
files, whose comparison scores judge the FIQA models (cross-model evaluation, as the paper does
with ArcFace, CurricularFace, MagFace, ...). `build` makes them once, `list` shows them.
"""

BUILD_HELP = f"""\
Build the reference matchers of a spec (default {DEFAULT_SPEC.relative_to(DEFAULT_SPEC.parents[2])}),
or reuse the ones built before.

For each matcher of the spec:
  1 train    face recognition only (loss.mode fr, no regression half, no quality loss) on the
             spec's synthetic training set, whose generator seed (2,000,000 by default) is disjoint
             from every FIQA training and evaluation seed, so no matcher has seen their identities;
             here with --nproc processes, or on SLURM with --submit PROFILE (here when the cluster
             cannot run, saying why). Each training is an MLflow run tagged igfiqa.role=matcher.
  2 export   OUT/<name>.onnx with an `embedding` output, checked against torch with onnxruntime
  3 measure  10-fold verification accuracy of the ONNX file on clean.bin and mixed.bin of an
             unseen seed (the spec's evaluation sets, made under OUT/sets/)
  4 record   OUT/{MATCHERS_FILE}: name, ONNX path and SHA-256, backbone, margin, embedding size,
             seed, training data fingerprint, clean/mixed accuracy, MLflow run, resolved config

Built once: a matcher whose recipe (resolved config + training data) is unchanged and whose ONNX
file still has its recorded SHA-256 is reused untouched; a changed recipe trains that matcher
alone again; an interrupted training resumes from its last checkpoint. Use an ONNX file with
`igfiqa eval CHECKPOINT --data VAL --fr-model OUT/<name>.onnx`.

examples:
  igfiqa matchers build                                   # every matcher of the default spec
  igfiqa matchers build --only cosface-tiny --out work/demo/matchers
  igfiqa matchers build configs/matchers/synthetic.yaml --submit slurm/clusters/local.yaml
  igfiqa matchers list
"""

LIST_HELP = f"""\
Print OUT/{MATCHERS_FILE} as a table: each matcher's backbone, margin, embedding size, seed, training
steps, clean and mixed verification accuracy, training wall time and ONNX file.

examples:
  igfiqa matchers list
  igfiqa matchers list --out work/demo/matchers
"""


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the matchers' folder (default: {DEFAULT_OUT})"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `matchers build` and `matchers list`."""
    group = sub.add_parser(
        "matchers",
        help="reference matchers: independent FR models (ONNX) for cross-model evaluation",
        description=GROUP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="matchers_command", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="train, export and measure the spec's matchers (reusing finished ones)",
        description=BUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "spec", type=Path, nargs="?", default=DEFAULT_SPEC, help="matchers spec YAML (default: %(default)s)"
    )
    build.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="build only this matcher of the spec (repeatable); the others' records stay as they are",
    )
    _add_out(build)
    build.add_argument(
        "--nproc", type=int, default=2, metavar="N", help="processes when training here (default: 2)"
    )
    build.add_argument(
        "--submit",
        type=Path,
        default=None,
        metavar="PROFILE",
        help="train on SLURM with this cluster profile, e.g. slurm/clusters/local.yaml (default: here)",
    )
    build.set_defaults(func=run_build)
    listing = actions.add_parser(
        "list",
        help="print the built matchers as a table",
        description=LIST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_out(listing)
    listing.set_defaults(func=run_list)
    group.set_defaults(func=lambda args: print_usage(group))


def run_build(args: argparse.Namespace) -> int:
    """Handler of `igfiqa matchers build`."""
    from jobs.stages.matcher_spec import load_matchers_spec
    from jobs.stages.matchers import MatcherLaunch, build_matchers, matchers_table, read_matchers

    spec = load_matchers_spec(args.spec)
    build_matchers(
        spec,
        args.out,
        only=args.only,
        launch=MatcherLaunch(nproc=args.nproc, cluster=args.submit),
        say=say,
        job_log=sys.stdout,
    )
    print(matchers_table(read_matchers(args.out), args.out))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Handler of `igfiqa matchers list`."""
    from jobs.stages.matchers import matchers_table, read_matchers

    print(matchers_table(read_matchers(args.out), args.out))
    return 0
