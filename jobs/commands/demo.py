"""`igfiqa demo`: the main job end to end on the embedded synthetic data, in a few minutes on a CPU.

Argument parsing and printing; the eight stages (synth, convert, bins, preview, train, evaluate,
matcher, efficacy) are `jobs.stages`, each reused when an earlier run finished it, so the demo is resumable and a
second run only prints the summary.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import UserError
from jobs.stages.work import StageClock, WorkFolder, shown_path

if TYPE_CHECKING:
    from jobs.stages.evaluate import EvalSummary
    from jobs.stages.matcher_spec import MatchersSpec
    from jobs.stages.train import TrainOutcome
    from pipeline.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
DEFAULT_CLUSTER = REPO / "slurm" / "clusters" / "local.yaml"
DEFAULT_MATCHERS_SPEC = REPO / "configs" / "matchers" / "synthetic.yaml"
DEFAULT_MATCHERS_OUT = Path("work/matchers")  # jobs.stages.matchers.DEFAULT_OUT
# 0 = the config's full schedule: tiny_cpu's 8 epochs (488 steps at 200 identities x 40 images).
DEFAULT_STEPS = 0
DEFAULT_IDENTITIES = 200
DEFAULT_IMAGES_PER_IDENTITY = 40  # configs/tiny_cpu.yaml's recipe is tuned on 200 x 40 images
# the primary set: 3,000 images, 13,500 mated and 4,485,000 non-mated pairs (FMR 1e-4: ~450 false matches)
DEFAULT_PRIMARY_IDENTITIES = 300
DEFAULT_PRIMARY_IMAGES = 10
DEFAULT_MATCHER = "cosface-tiny"
STAGE_COUNT = 8
LABEL = "demo"  # of the stage headers and the marker files (run/demo-train.json, ...)

DESCRIPTION = """\
Run the whole IG-FIQA job on the embedded synthetic data, in a few minutes on a CPU:

  1 synthesize   identities × images, plus clean.bin and mixed.bin verification sets
  2 convert      the training set into DALI shards
  3 bins         the verification sets into shards
  4 preview      the augmentation grid (clean image beside its regression-half versions)
  5 train        configs/tiny_cpu.yaml in IG mode, 2 tasks on the local SLURM cluster through
                 submitit (its log is followed until it ends); here instead when no cluster can
                 run (no SLURM, the controller does not answer, --local), saying why
  6 evaluate     EDC/ERC and verification accuracy on both sets, an MLflow child run of training
  7 matcher      the reference matcher --matcher of --matchers-spec (an independent FR-only model,
                 ONNX), built into --matchers-out on the cluster (here with --local; cosface-tiny
                 takes ~9 min on 2 cores), or reused when built before with the same recipe
  8 efficacy     PRIMARY protocol (docs/evaluation.md): an identity-labelled set of seed
                 --seed + 3,000,000 (never trained on; --primary-identities x
                 --primary-images-per-identity images, all pairs), quality from one forward pass,
                 comparisons by the matcher: EDC pAUC (discard <= 0.2) and ERC AUC at FMR 1e-3 and
                 1e-4, each beside random quality and the oracle (quality = -strength).
                 SECONDARY, labelled: own backbone and test-time flip on FRESH clean/mixed sets of
                 seed --seed + 1,000,000 (--fresh-pairs pairs each): clean accuracy, Spearman(quality,
                 degradation strength), EDC pAUC ratio at FMR 1e-2. Both in the summary and as
                 fresh.primary.* / fresh.secondary.* metrics in MLflow

Everything goes under --out: synth/, train/, val/, augmentation_preview.png, run/ (checkpoints,
plots, submitit logs), eval/ (table.md, quality_<set>.png, ..., primary/: the primary protocol's
report), fresh/ (the unseen sets), mlflow.db and mlartifacts/; the matcher under --matchers-out.
Running it again reuses every finished stage (an interrupted training resumes from its last
checkpoint) and prints the summary again; remove --out to start afresh.

examples:
  igfiqa demo                                   # what `make demo` runs
  igfiqa demo --local --steps 40                # no cluster, a shorter training
  igfiqa demo --out work/demo-small --identities 40 --steps 20
  igfiqa demo --matchers-out /shared/matchers   # reuse matchers built elsewhere
"""


# ----------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    """Add `igfiqa demo`."""
    p = sub.add_parser(
        "demo",
        help="the whole chain on synthetic data: prep, train (SLURM or here), evaluate, MLflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("work/demo"), help="output folder (default: work/demo)")
    p.add_argument("--local", action="store_true", help="train here even when a SLURM cluster is up")
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        metavar="N",
        help="stop training after N steps (default: 0 = the config's full schedule, 8 epochs = 488 steps "
        "at 200 identities x 40 images); N beyond the schedule needs --set optim.epochs=E",
    )
    p.add_argument(
        "--fmr",
        nargs="+",
        type=float,
        default=None,
        help="FMRs of the EDC/ERC evaluation (default: those the verification sets resolve, "
        "FMR x non-mated pairs >= 10: 1e-2 for the demo's 2,000-pair sets)",
    )
    p.add_argument(
        "--identities",
        type=int,
        default=DEFAULT_IDENTITIES,
        metavar="N",
        help=f"synthetic training identities (default: {DEFAULT_IDENTITIES})",
    )
    p.add_argument(
        "--images-per-identity",
        type=int,
        default=DEFAULT_IMAGES_PER_IDENTITY,
        metavar="N",
        help=f"mean images per identity (default: {DEFAULT_IMAGES_PER_IDENTITY})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    p.add_argument(
        "--fresh-pairs",
        type=int,
        default=2000,
        metavar="N",
        help="pairs per fresh verification set of the efficacy stage's secondary figures (default: "
        "2000, so FMR 1e-2 is resolved; 0 skips the matcher and efficacy stages)",
    )
    p.add_argument(
        "--primary-identities",
        type=int,
        default=DEFAULT_PRIMARY_IDENTITIES,
        metavar="N",
        help=f"identities of the primary protocol's identity-labelled set (default: {DEFAULT_PRIMARY_IDENTITIES})",
    )
    p.add_argument(
        "--primary-images-per-identity",
        type=int,
        default=DEFAULT_PRIMARY_IMAGES,
        metavar="N",
        help=f"images per identity of that set (default: {DEFAULT_PRIMARY_IMAGES}); identities x images "
        "must give FMR 1e-4 x non-mated pairs >= 10",
    )
    p.add_argument(
        "--matcher",
        default=DEFAULT_MATCHER,
        metavar="NAME",
        help=f"the reference matcher of the primary protocol, a name in --matchers-spec (default: {DEFAULT_MATCHER})",
    )
    p.add_argument(
        "--matchers-spec",
        type=Path,
        default=DEFAULT_MATCHERS_SPEC,
        metavar="YAML",
        help="the matchers spec that defines it (default: configs/matchers/synthetic.yaml)",
    )
    p.add_argument(
        "--matchers-out",
        type=Path,
        default=DEFAULT_MATCHERS_OUT,
        metavar="DIR",
        help="where the matcher is built, or found built with the same recipe and reused "
        f"(default: {DEFAULT_MATCHERS_OUT}, as `igfiqa matchers build`)",
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: configs/tiny_cpu.yaml)"
    )
    p.add_argument(
        "--cluster",
        type=Path,
        default=DEFAULT_CLUSTER,
        metavar="PROFILE",
        help="cluster profile (default: slurm/clusters/local.yaml)",
    )
    p.add_argument(
        "--nproc", type=int, default=2, metavar="N", help="processes when training here (default: 2)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, repeatable, e.g. --set loss.mode=cr",
    )
    p.set_defaults(func=run_demo)


def say(text: str) -> None:
    """A progress line of the demo (stdout, flushed so it interleaves with the job's log)."""
    print(text, flush=True)


# ----------------------------------------------------------------------------- summary


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that shows the demo's runs (the venv's mlflow when it is not on PATH)."""
    executable = "mlflow"
    if shutil.which("mlflow") is None:
        beside_python = Path(sys.executable).parent / "mlflow"
        if beside_python.exists():
            executable = shown_path(beside_python)
    return f"{executable} ui --backend-store-uri {tracking_uri}"


def summary_text(
    paths: WorkFolder,
    config: TrainConfig,
    trained: TrainOutcome,
    evaluated: EvalSummary,
    clock: StageClock,
    figures: dict[str, float] | None = None,
) -> str:
    """Where to look: the MLflow UI, the PNGs, the table, the fresh-set figures, the stage timings."""
    from jobs.stages.efficacy import efficacy_lines

    plots = Path(config.run.dir) / "plots"
    epoch_histograms = sorted(plots.glob("weights-epoch-*.png"))
    pictures = [
        ("augmentation grid", [paths.preview]),
        ("EDC/ERC curves", evaluated.pngs),
        ("weight histogram", [plots / "class_weights.png"]),
        ("  vs ground truth", [plots / "class_weights_vs_truth.png"]),
        ("  per epoch", epoch_histograms),
        ("training curves", [plots / "training_curves.png"]),
    ]
    lines = [
        "",
        "=" * 78,
        f"IG-FIQA demo finished: trained {trained.global_step} steps {trained.where}",
        "=" * 78,
        f"results ({shown_path(evaluated.table_md)}):",
        "",
        evaluated.table_md.read_text().rstrip(),
        "",
        *([*efficacy_lines(figures), ""] if figures else []),
        "look at:",
        f"  MLflow UI          {mlflow_ui_command(paths.tracking_uri)}",
        f"                     then open http://127.0.0.1:5000, experiment {config.run.experiment!r}: "
        f"training run {trained.mlflow_run_id}",
        f"                     with its eval child run {evaluated.mlflow_run_id or '(not logged)'}",
    ]
    for label, files in pictures:
        present = [shown_path(f) for f in files if f.is_file()]
        if present:
            lines.append(f"  {label:<18} {present[0]}")
            lines += [f"  {'':<18} {p}" for p in present[1:]]
    lines += [
        f"  checkpoint         {shown_path(Path(trained.checkpoint))}",
        f"  everything         {shown_path(paths.out)}/ (run again: finished stages are reused)",
        "",
        "wall time by stage:",
        clock.table(),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def _matchers_spec(args: argparse.Namespace) -> MatchersSpec:
    """--matchers-spec, read and checked before anything runs, with --matcher one of its names."""
    from jobs.stages.matcher_spec import load_matchers_spec

    if not args.matchers_spec.is_file():
        raise UserError(f"--matchers-spec {args.matchers_spec}: no such file")
    spec = load_matchers_spec(args.matchers_spec)
    if args.matcher not in spec.names():
        raise UserError(
            f"--matcher {args.matcher}: no such matcher in {shown_path(args.matchers_spec)} "
            f"(it has {', '.join(spec.names())})"
        )
    return spec


def run_demo(args: argparse.Namespace) -> int:
    """Handler of `igfiqa demo`."""
    from jobs.stages.data import SynthSpec, bins_stage, convert_stage, preview_stage, synth_stage
    from jobs.stages.efficacy import Matcher, PrimarySet, efficacy_stage, fresh_seed, primary_seed
    from jobs.stages.evaluate import evaluate_stage
    from jobs.stages.matchers import MatcherLaunch, matcher_stage
    from jobs.stages.train import plot_weights_against_ground_truth, train_stage, training_config

    if args.steps < 0 or args.identities < 2 or args.images_per_identity < 1:
        raise UserError("--steps must be >= 0, --identities >= 2 and --images-per-identity >= 1")
    if args.fmr and not all(0.0 < f < 1.0 for f in args.fmr):
        raise UserError(f"--fmr values must lie in (0, 1), got {args.fmr}")
    if args.nproc < 1:
        raise UserError("--nproc must be >= 1")
    if args.fresh_pairs < 0:
        raise UserError("--fresh-pairs must be >= 0 (0 skips the matcher and efficacy stages)")
    matchers_spec = _matchers_spec(args) if args.fresh_pairs else None
    primary = PrimarySet(
        seed=primary_seed(args.seed),
        identities=args.primary_identities,
        images_per_identity=args.primary_images_per_identity,
    )
    if matchers_spec is not None:
        primary.check(
            training_seed=args.seed,
            other_seeds={
                "the fresh sets' seed (--seed + 1,000,000)": fresh_seed(args.seed),
                f"the matchers' training data seed ({shown_path(args.matchers_spec)})": matchers_spec.data.seed,
            },
        )
    paths = WorkFolder(args.out)
    if paths.out.exists() and not paths.out.is_dir():
        raise UserError(f"--out {paths.out} exists and is not a folder")
    paths.out.mkdir(parents=True, exist_ok=True)
    if not args.config.is_file():
        raise UserError(f"{args.config}: no such config (the demo's default is {DEFAULT_CONFIG})")
    config = training_config(
        args.config, paths, paths.run, [f"optim.max_steps={args.steps}", "run.name=demo", *args.overrides]
    )
    clock = StageClock(LABEL, STAGE_COUNT, say)
    say(f"IG-FIQA demo in {shown_path(paths.out)} (config {shown_path(args.config.resolve())})")

    spec = SynthSpec(identities=args.identities, images_per_identity=args.images_per_identity, seed=args.seed)
    what = f"{args.identities} identities × ~{args.images_per_identity} images + clean/mixed .bin sets"
    with clock.stage("synth", f"{what} → {shown_path(paths.synth)}") as record:
        synth_stage(paths, spec, record)
    with clock.stage("convert", f"training set → DALI shards in {shown_path(paths.train)}") as record:
        convert_stage(paths, record)
    with clock.stage("bins", f"verification sets → {shown_path(paths.val)}") as record:
        bins_stage(paths, record)
    with clock.stage("preview", f"augmentation grid → {shown_path(paths.preview)}") as record:
        preview_stage(paths, config.data.augment, record)
    steps = f"{args.steps} steps" if args.steps else "the config's epochs"
    with clock.stage("train", f"{config.model.backbone}, loss {config.loss.mode}, {steps}") as record:
        trained = train_stage(
            config,
            record,
            label=LABEL,
            nproc=args.nproc,
            here_because="--local was given" if args.local else None,
            cluster=args.cluster,
            say=say,
            job_log=sys.stdout,
        )
    evaluate_what = f"step {trained.global_step} on {shown_path(paths.val)} → {shown_path(paths.eval)}"
    with clock.stage("evaluate", evaluate_what) as record:
        evaluated = evaluate_stage(paths, trained, args.fmr, record, label=LABEL)
    figures, matcher = None, None
    matcher_what = (
        f"{args.matcher} of {shown_path(args.matchers_spec.resolve())} → {shown_path(args.matchers_out)}"
    )
    with clock.stage("matcher", matcher_what) as record:
        if matchers_spec is not None:
            # on the demo's cluster profile like its training (here with --local, or when SLURM cannot run)
            launch = MatcherLaunch(nproc=args.nproc, cluster=None if args.local else args.cluster)
            built = matcher_stage(
                matchers_spec, args.matchers_out, args.matcher, record, launch=launch, say=say
            )
            onnx = built.onnx_path(args.matchers_out.resolve())
            matcher = Matcher(built.name, onnx, built.sha256)
        else:
            record.reused, record.note = True, "skipped (--fresh-pairs 0)"
    seed = fresh_seed(args.seed)
    efficacy_what = (
        f"primary: identity set of seed {primary.seed} by {args.matcher}; "
        f"secondary: fresh sets of seed {seed}, {args.fresh_pairs} pairs each"
    )
    with clock.stage("efficacy", efficacy_what) as record:
        if matcher is not None:
            figures = efficacy_stage(
                paths,
                trained,
                record,
                seed=seed,
                primary=primary,
                matcher=matcher,
                label=LABEL,
                run_ids=[r for r in (evaluated.mlflow_run_id, trained.mlflow_run_id) if r],
                pairs=args.fresh_pairs,
            )
        else:
            record.reused, record.note = True, "skipped (--fresh-pairs 0)"

    plot_weights_against_ground_truth(paths, Path(config.run.dir))
    summary = summary_text(paths, config, trained, evaluated, clock, figures)
    print(summary, flush=True)
    (paths.out / "SUMMARY.txt").write_text(summary + "\n")
    return 0
