"""`igfiqa study run | status | report`: arms × paired seeds, trained and measured, then compared.

Argument parsing and printing; the spec is `jobs.study.spec`, running `jobs.study.runner`, the
report `jobs.study.report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import print_usage, say

GROUP_HELP = """\
A study trains every arm of a spec (a base config with --set overrides) with every seed on the same
training data, measures each final model by the primary protocol (one forward pass; EDC pAUC and the
paper's ERC AUC by each independent matcher, beside random quality and the oracle), and compares
the arms seed by seed (paired bootstrap interval of the mean difference, sign test).
"""

RUN_HELP = """\
Prepare the study's training data, evaluation sets and matchers (once), then train and measure every
run not measured yet: as one SLURM array job on the spec's cluster profile (launch.cluster, or
--cluster), or with --local on this machine with --workers processes.

Resumable: a measured run is never touched again; a trained run is only measured; an interrupted
training resumes from its last checkpoint; a run whose SLURM job still runs is not submitted again;
a failed run (study-failed.json in its folder) is tried again. Kill it at any time and run it again.

examples:
  igfiqa study run configs/study/small_cpu.yaml --local --workers 2
  igfiqa study run configs/study/small_cpu.yaml --cluster slurm/clusters/local.yaml
  igfiqa study run configs/study/protocol_s.yaml --no-wait
"""

STATUS_HELP = """\
Print every run of the study: arm, seed, state (pending, training, trained, measured, failed) and
the step of its last checkpoint.

examples:
  igfiqa study status configs/study/small_cpu.yaml
"""

REPORT_HELP = """\
Write the study's report under OUT/report from the runs measured so far: per arm and matcher the
mean ± 95 % interval of the endpoint beside the oracle, the spec's hypotheses as paired
comparisons, FR accuracy per arm, the failure case against the synthetic ground truth, EDC/ERC
curves per arm with 95 % bands (the paper's Fig. 5), and an MLflow parent run of the training runs.

examples:
  igfiqa study report configs/study/small_cpu.yaml
  igfiqa study report configs/study/small_cpu.yaml --docs-img docs/img --no-track
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add `study run`, `study status` and `study report`."""
    group = sub.add_parser(
        "study",
        help="arms x paired seeds: train, measure, compare (the paper's claims)",
        description=GROUP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="study_command", metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="train and measure every unfinished run",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", type=Path, help="study spec YAML (see configs/study/)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run here instead of on SLURM")
    where.add_argument(
        "--cluster",
        type=Path,
        default=None,
        metavar="PROFILE",
        help="SLURM cluster profile (default: the spec's)",
    )
    run.add_argument("--workers", type=int, default=1, metavar="N", help="local processes (default: 1)")
    run.add_argument(
        "--no-wait", action="store_true", help="submit and return (SLURM); `study status` follows the runs"
    )
    run.set_defaults(func=run_study)
    status = actions.add_parser(
        "status",
        help="where every run stands",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("spec", type=Path)
    status.set_defaults(func=show_status)
    report = actions.add_parser(
        "report",
        help="tables, plots, paired tests and the MLflow parent run",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("spec", type=Path)
    report.add_argument("--docs-img", type=Path, default=None, help="also copy the plots here")
    report.add_argument("--no-track", action="store_true", help="do not log the MLflow parent run")
    report.set_defaults(func=report_study)
    group.set_defaults(func=lambda args: print_usage(group))


def run_study(args: argparse.Namespace) -> int:
    """Handler of `igfiqa study run`."""
    from jobs.errors import UserError
    from jobs.study.runner import (
        active_runs,
        prepare,
        run_local,
        status_table,
        study_status,
        submit_runs,
        wait_for_runs,
    )
    from jobs.study.spec import load_study_spec

    spec = load_study_spec(args.spec)
    cluster = (
        None if args.local else (args.cluster or (Path(spec.launch.cluster) if spec.launch.cluster else None))
    )
    if not args.local and cluster is None:
        raise UserError(
            f"{spec.source}: no cluster profile (launch.cluster); give --cluster PROFILE or --local"
        )
    say(f"study {spec.name}: {len(spec.runs())} runs in {spec.out}")
    prepare(spec, cluster=cluster, say=say)
    if args.local:
        codes = run_local(spec, workers=args.workers, say=say)
        say(status_table(study_status(spec)))
        return 0 if all(code == 0 for code in codes) else 1
    assert cluster is not None
    statuses = {s.run: s for s in study_status(spec)}
    todo = [r for r in spec.runs() if statuses[r.name].to_do]
    array = submit_runs(spec, todo, cluster, say=say) if todo else None
    if args.no_wait:
        say(f"  follow with `igfiqa study status {args.spec}`")
        return 0
    if array is not None:
        array.wait()
    wait_for_runs(spec, active_runs(spec), say=say)
    final = study_status(spec)
    say(status_table(final))
    return 0 if all(s.state == "measured" for s in final) else 1


def show_status(args: argparse.Namespace) -> int:
    """Handler of `igfiqa study status`."""
    from jobs.study.runner import status_table, study_status
    from jobs.study.spec import load_study_spec

    say(status_table(study_status(load_study_spec(args.spec))))
    return 0


def report_study(args: argparse.Namespace) -> int:
    """Handler of `igfiqa study report`."""
    from jobs.study.report import log_parent_run, write_report
    from jobs.study.runner import study_folder
    from jobs.study.spec import load_study_spec

    spec = load_study_spec(args.spec)
    summary = write_report(spec, docs_img=args.docs_img)
    say(
        f"report of {summary['measured']} of {summary['runs']} runs: {study_folder(spec).report / 'tables.md'}"
    )
    if not args.no_track:
        say(f"MLflow parent run {log_parent_run(spec, summary)} ({study_folder(spec).tracking_uri})")
    return 0
