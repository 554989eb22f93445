"""The small-scale reproduction study of IG-FIQA on the synthetic data (docs/reproduction.md).

    .venv/bin/python -m experiments.study --out work/study --epochs 3 --seeds 0 1 [--worker 0/2]

Trains the demo's recipe (configs/tiny_cpu.yaml, its schedule unless --epochs) in four modes with
every seed — CR (loss.mode=cr), IG without augmentation (the paper's S−), IG with augmentation
(α linear 0.9 → 1.0), and IG with the joint forward (model.forward=joint: both halves through
the backbone in one batch, the paper's Tab. 1b ablation) — plus, unless --no-alpha-ablation,
the α ablation (fixed 0.9, fixed 0.99; first seed only), saving a checkpoint at every epoch
end. Then measures each run against the synthetic ground truth (experiments/study_measure.py),
and its final model on fresh verification sets of an unseen seed (the demo's efficacy figures),
and writes the tables and plots (experiments/study_report.py) under OUT/report, logs them as
an MLflow run "study-summary" (each training run is logged by the trainer itself).

Resumable: a finished training (OUT/runs/NAME/study-train.json) and a finished measurement
(OUT/runs/NAME/measurements.json) are reused; an interrupted training resumes from its
last checkpoint. `--worker I/N` takes every N-th run starting at I, so N processes can share
the runs; the report is written by whichever call finds every run measured.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.stages.data import SynthSpec, prepare_data
from jobs.stages.train import TrainOutcome, train_stage, training_config
from jobs.stages.work import StageRecord, WorkFolder, marker_name, read_json_object, write_json_atomically

log = logging.getLogger("experiments.study")

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
NO_AUGMENTATION = ("data.augment.p_rescale=0", "data.augment.p_erase=0", "data.augment.p_color=0")
LABEL = "study"  # of the marker files: runs/NAME/study-train.json
TRAIN_MARKER = marker_name(LABEL, "train")
MEASUREMENT_FILE = "measurements.json"
RANDOM_DRAWS = 20
MAIN_GROUPS = ("CR", "IG S- (no aug)", "IG (aug)")
FORWARD_GROUPS = ("IG (aug)", "IG joint forward")
ALPHA_GROUPS = ("IG α fixed 0.9", "IG α fixed 0.99", "IG (aug)")  # the last is α linear 0.9 → 1.0


@dataclass(frozen=True)
class StudyRun:
    """One training of the study: its folder name, its group in the tables, seed and config overrides."""

    name: str
    group: str
    seed: int
    overrides: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class StudySpec:
    """What the study trains and measures: the keys, types and defaults of its settings, once.

    Built from the command line by the typed loader (`pipeline.config_loader.from_mapping`), so a
    spec file would be read and checked the same way; `study_runs` turns it into the runs.
    """

    config: str = str(BASE_CONFIG)  # the training config every run starts from
    epochs: int | None = None  # None: the config's schedule
    seeds: tuple[int, ...] = (0, 1, 2)
    identities: int = 200  # of the synthetic training data
    images_per_identity: int = 40  # as the demo's data
    data_seed: int = 0  # of the synthetic data
    fmr: tuple[float, ...] = (1e-3, 1e-4)
    extra_fmr: float = 0.1  # also reported, with a random-quality baseline: one the small sets resolve
    fresh_pairs: int = 2000  # per fresh verification set of seed data_seed + 1,000,000 (0 skips)
    alpha_ablation: bool = True  # the α ablation's two runs (fixed 0.9, fixed 0.99)
    overrides: tuple[str, ...] = ()  # config overrides of every run


def check_spec(spec: StudySpec) -> None:
    """ConfigError naming the key of a setting out of range."""
    from pipeline.config import ConfigError

    if spec.epochs is not None and spec.epochs < 1:
        raise ConfigError(f"epochs: {spec.epochs} must be >= 1 (or null: the config's schedule)")
    if not spec.seeds:
        raise ConfigError("seeds: need at least one seed")


def study_runs(seeds: list[int] | tuple[int, ...], *, alpha_ablation: bool = True) -> list[StudyRun]:
    """Every mode with every seed, then the α ablation's fixed schedules with the first seed."""
    runs = []
    for seed in seeds:
        runs += [
            StudyRun(f"cr-s{seed}", "CR", seed, ("loss.mode=cr",)),
            StudyRun(f"ig-noaug-s{seed}", "IG S- (no aug)", seed, NO_AUGMENTATION),
            StudyRun(f"ig-aug-s{seed}", "IG (aug)", seed),
            StudyRun(f"ig-joint-s{seed}", "IG joint forward", seed, ("model.forward=joint",)),
        ]
    for alpha in (0.9, 0.99) if alpha_ablation else ():
        runs.append(
            StudyRun(
                f"ig-alpha{alpha}-s{seeds[0]}",
                f"IG α fixed {alpha}",
                seeds[0],
                ("variance.alpha_schedule=fixed", f"variance.alpha_start={alpha}"),
            )
        )
    return runs


class StudyPaths(WorkFolder):
    """The study's working folder: the demo's layout plus runs/NAME/ (one per training) and report/."""

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def report(self) -> Path:
        return self.out / "report"


def steps_per_epoch(paths: StudyPaths, config: Any) -> int:
    """Steps of one epoch of `config` on the study's training set: its `BatchLayout` on one process."""
    from data_prep.dataset import load_dataset_info
    from pipeline.config import BatchLayout

    return BatchLayout.of(config.data, 1, load_dataset_info(paths.train).num_images).steps_per_epoch


def run_config(run: StudyRun, paths: StudyPaths, spec: StudySpec) -> Any:
    """The base config with the study's data, run folder, schedule and per-epoch checkpoints, then the run's."""
    from pipeline.config import ConfigError, load_config

    # the batch sizes the run trains with (the study's --set may change them), so one checkpoint per epoch
    probe = load_config(spec.config, [f"data.dataset={paths.train}", *run.overrides, *spec.overrides])
    try:
        per_epoch = steps_per_epoch(paths, probe)
    except ConfigError as exc:
        raise ConfigError(f"{paths.train}: {exc}: synthesize more or --set smaller batches") from None
    schedule = []  # the config's epochs and milestones unless --epochs
    if spec.epochs is not None:
        schedule = [f"optim.epochs={spec.epochs}", f"optim.milestones=[{max(1, round(0.75 * spec.epochs))}]"]
    overrides = [
        "data.num_threads=1",
        "run.experiment=igfiqa-study",
        f"run.name=study-{run.name}",
        f"run.seed={run.seed}",
        f"data.seed={run.seed}",
        *schedule,
        f"run.checkpoint_every_steps={per_epoch}",
        "run.checkpoint_every_minutes=0",
        "run.keep_checkpoints=1000",
        *run.overrides,
        *spec.overrides,
    ]
    return training_config(Path(spec.config), paths, paths.runs / run.name, overrides)


def train_run(run: StudyRun, config: Any) -> TrainOutcome:
    """Train one run in this process (1 process, no SLURM) unless it finished before."""
    record = StageRecord(run.name)
    outcome = train_stage(
        config,
        record,
        label=LABEL,
        nproc=1,
        here_because="the study trains its runs one after the other in this process",
        cluster=None,
        say=log.info,
        job_log=sys.stderr,
    )
    if record.reused:
        log.info("%s: training finished before (step %s), reused", run.name, outcome.global_step)
    else:
        log.info("%s: trained %d steps in %.0f s", run.name, outcome.global_step, outcome.seconds)
    return outcome


def fresh_figures(outcome: TrainOutcome, fresh: Any) -> dict[str, float]:
    """The demo's efficacy figures of the run's final model on the fresh sets (unseen identities),
    measured as the demo measures them (`jobs.stages.efficacy.efficacy_options`)."""
    from jobs.stages.efficacy import efficacy_options
    from pipeline.evaluation.efficacy import measure_checkpoint

    return measure_checkpoint(Path(outcome.checkpoint), fresh, efficacy_options()).figures()


def _fresh_figures_current(cached: dict, fresh: Any) -> bool:
    """Whether cached fresh-set figures are of these sets and of the demo's protocol (flip or not)."""
    from jobs.stages.efficacy import efficacy_options

    figures = cached.get("fresh", {})
    return figures.get("seed") == fresh.seed and figures.get("flip") == float(efficacy_options().flip)


def measure(
    run: StudyRun,
    config: Any,
    paths: StudyPaths,
    images: Any,
    fmrs: tuple[float, ...],
    outcome: TrainOutcome,
    fresh: Any,
) -> dict:
    """The run's measurements (experiments/study_measure.py) and fresh-set figures, cached in its folder."""
    from experiments.study_measure import measure_run

    run_dir = Path(config.run.dir)
    cached = read_json_object(run_dir / MEASUREMENT_FILE)
    if cached is not None:
        if "table_pearson_final_backbone" not in cached["epochs"][0]:  # cached without this measurement
            from experiments.study_measure import add_final_backbone_correlations

            add_final_backbone_correlations(cached["epochs"], run_dir, steps_per_epoch(paths, config), images)
            write_json_atomically(run_dir / MEASUREMENT_FILE, cached)
        if fresh is not None and not _fresh_figures_current(cached, fresh):
            cached["fresh"] = fresh_figures(outcome, fresh)
            write_json_atomically(run_dir / MEASUREMENT_FILE, cached)
        return cached
    started = time.monotonic()
    measured = measure_run(run_dir, steps_per_epoch(paths, config), images, paths.val, paths.synth, fmrs)
    if fresh is not None:
        measured["fresh"] = fresh_figures(outcome, fresh)
    measured["seconds"] = time.monotonic() - started
    write_json_atomically(run_dir / MEASUREMENT_FILE, measured)
    log.info("%s: measured in %.0f s", run.name, measured["seconds"])
    return measured


def _fmr_key(fmr: float) -> str:
    from pipeline.evaluation.report import fmr_label

    return f"fmr_{fmr_label(fmr)}"


def reference_metrics(eval_dir: Path, fmr: float, draws: int = RANDOM_DRAWS) -> dict[str, float]:
    """EDC pAUC / ERC AUC at an FMR the small sets resolve, for the model's quality and for random quality.

    Read from the final evaluation's pairs_<set>.parquet / scores_<set>.parquet; "random" is the
    mean over `draws` random permutations of the scores (what no quality information gives).
    """
    import numpy as np
    import pandas as pd

    from pipeline.evaluation.quality_metrics import evaluate_quality

    rng = np.random.default_rng(0)
    label = _fmr_key(fmr)
    metrics: dict[str, float] = {}
    for pairs_path in sorted(eval_dir.glob("pairs_*.parquet")):
        name = pairs_path.stem.removeprefix("pairs_")
        pairs = pd.read_parquet(pairs_path)
        scores = pd.read_parquet(eval_dir / f"scores_{name}.parquet")
        method = next(c for c in scores.columns if c != "image")
        for k in range(draws):
            scores[f"random{k}"] = rng.permutation(scores[method].to_numpy())
        evaluation = evaluate_quality(pairs, scores, dataset=name, fmrs=[fmr])
        by_method = {r.method: r for r in evaluation.results}
        metrics[f"{name}.{method}.edc_pauc.{label}"] = by_method[method].edc_pauc
        metrics[f"{name}.{method}.erc_auc.{label}"] = by_method[method].erc.auc
        metrics[f"{name}.random.edc_pauc.{label}"] = float(
            np.mean([by_method[f"random{k}"].edc_pauc for k in range(draws)])
        )
        metrics[f"{name}.random.erc_auc.{label}"] = float(
            np.mean([by_method[f"random{k}"].erc.auc for k in range(draws)])
        )
    return metrics


def write_report(
    paths: StudyPaths, runs: list[StudyRun], spec: StudySpec, images: Any, docs_img: Path | None = None
) -> dict[str, Any]:
    """Tables (markdown, CSV), plots and summary.json under OUT/report; copies plots to --docs-img."""
    import pandas as pd

    from experiments import study_report as report

    results = []
    for run in runs:
        run_dir = paths.runs / run.name
        results.append(
            {
                **asdict(run),
                "measurements": read_json_object(run_dir / MEASUREMENT_FILE),
                "training": read_json_object(run_dir / TRAIN_MARKER),
                "low_variance_class": images.low_variance_class.tolist(),
            }
        )
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    per_run = report.run_rows(results)
    per_epoch = report.epoch_rows(results)
    per_run["train_seconds"] = [r["training"]["seconds"] for r in results]
    per_run["mlflow_run_id"] = [r["training"]["mlflow_run_id"] for r in results]
    extra = pd.DataFrame(
        [reference_metrics(paths.runs / r["name"] / "eval", spec.extra_fmr) for r in results]
    )
    per_run = pd.concat([per_run, extra.drop(columns=[c for c in extra if c in per_run])], axis=1)
    per_run.to_csv(out / "runs.csv", index=False)
    per_epoch.to_csv(out / "epochs.csv", index=False)

    def present(columns: list[str]) -> list[str]:
        return [c for c in dict.fromkeys(columns) if c in per_run.columns]

    paper_fmr_columns = present(
        [
            f"{name}.IG-FIQA.{metric}.{_fmr_key(fmr)}"
            for name in ("clean", "mixed")
            for fmr in spec.fmr
            for metric in ("edc_pauc", "erc_auc")
        ]
    )
    resolvable_columns = present(
        [
            f"{name}.{method}.{metric}.{_fmr_key(spec.extra_fmr)}"
            for name in ("clean", "mixed")
            for method in ("IG-FIQA", "random")
            for metric in ("edc_pauc", "erc_auc")
        ]
    )
    quality_columns = present(
        ["train_quality_spearman", "mixed.quality_spearman", "clean.accuracy", "mixed.accuracy"]
    )
    fresh_columns = present(
        [
            f"fresh.{k}"
            for k in (
                "clean_accuracy",
                "mixed_accuracy",
                "mixed_spearman",
                "edc_ratio",
                "oracle_ratio",
                "edc_pauc",
                "random_pauc_mean",
                "fnmr",
            )
        ]
    )
    variance_columns = [
        "table_pearson",
        "weight_zero_frac",
        "lowvar_weight_mean",
        "other_weight_mean",
        "lowvar_auc_table",
        "lowvar_auc_true_variance",
    ]
    main = per_run[per_run["group"].isin(MAIN_GROUPS)]
    tables = {
        "edc_erc_paper_fmrs": report.mean_spread(main, paper_fmr_columns),
        f"edc_erc_{_fmr_key(spec.extra_fmr)}_vs_random": report.mean_spread(main, resolvable_columns),
        "fresh_sets_unseen_seed": report.mean_spread(
            per_run[per_run["group"].isin((*MAIN_GROUPS, *FORWARD_GROUPS))], fresh_columns
        ),
        "quality_vs_ground_truth": report.mean_spread(main, quality_columns),
        "low_variance_failure_case": report.mean_spread(
            main, ["lowvar_overrating", "lowvar_weight_mean", "other_weight_mean", "train_quality_spearman"]
        ),
        "variance_table": report.mean_spread(main, variance_columns),
        "forward_joint_vs_separate": report.mean_spread(
            per_run[per_run["group"].isin(FORWARD_GROUPS)],
            present(["clean.accuracy", "mixed.accuracy", *fresh_columns]),
        ),
    }
    alpha = per_run[per_run["group"].isin(ALPHA_GROUPS) & (per_run["seed"] == runs[0].seed)]
    alpha_epochs = per_epoch[per_epoch["group"].isin(ALPHA_GROUPS) & (per_epoch["seed"] == runs[0].seed)]
    has_alpha = alpha["group"].isin(ALPHA_GROUPS[:2]).any()
    if has_alpha:
        tables |= {
            "alpha_ablation_variance": report.mean_spread(alpha, variance_columns),
            "alpha_ablation_quality": report.mean_spread(
                alpha, present([*quality_columns[:2], *paper_fmr_columns, *resolvable_columns])
            ),
            "alpha_ablation_epochs": report.mean_spread(
                alpha_epochs.assign(group_epoch=lambda f: f["group"] + " / epoch " + f["epoch"].astype(str)),
                ["table_pearson", "weight_zero_frac", "lowvar_auc_table"],
                by="group_epoch",
            ),
        }
    epochs = spec.epochs or "the config's"
    lines = [
        f"# Study report ({epochs} epochs, seeds {list(spec.seeds)})",
        "",
        "mean ± half-width of the 95 % t-interval over seeds",
        "",
    ]
    for name, table in tables.items():
        table.to_csv(out / f"table_{name}.csv")
        lines += [f"## {name}", "", report.to_markdown(table), ""]
    main_epochs = per_epoch[per_epoch["group"].isin(MAIN_GROUPS)]
    for column in (
        "table_pearson",
        "table_pearson_final_backbone",
        "weight_zero_frac",
        "lowvar_auc_table",
        "lowvar_overrating",
    ):
        table = report.per_epoch_table(main_epochs, column)
        table.to_csv(out / f"table_epochs_{column}.csv")
        lines += [
            f"## {column} per epoch (mean ± 95 % half-width over seeds)",
            "",
            report.to_markdown(table),
            "",
        ]
    (out / "tables.md").write_text("\n".join(lines))
    plots = [
        report.plot_weight_histograms(results, list(MAIN_GROUPS), out / "study_weight_histograms.png"),
        report.plot_epoch_curves(
            per_epoch[per_epoch["group"].isin(MAIN_GROUPS)], MAIN_GROUPS, out / "study_epochs.png"
        ),
        report.plot_group_figures(per_run, [*MAIN_GROUPS, *FORWARD_GROUPS[1:]], out / "study_figures.png"),
    ]
    if has_alpha:
        plots += [
            report.plot_weight_histograms(
                results, list(ALPHA_GROUPS[:2]), out / "study_alpha_weight_histograms.png"
            ),
            report.plot_epoch_curves(alpha_epochs, ALPHA_GROUPS, out / "study_alpha_epochs.png"),
        ]
    if docs_img is not None:
        docs_img.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            shutil.copy2(plot, docs_img / plot.name)
    summary = {
        "epochs": spec.epochs,
        "seeds": list(spec.seeds),
        "fmrs": list(spec.fmr),
        "extra_fmr": spec.extra_fmr,
        "runs": per_run.to_dict(orient="records"),
        "train_seconds_total": float(per_run["train_seconds"].sum()),
    }
    write_json_atomically(out / "summary.json", summary)
    return summary


def log_summary_run(paths: StudyPaths, spec: StudySpec, summary: dict[str, Any]) -> str:
    """The study's own MLflow run: params, per-group mean metrics, the report folder as artifacts."""
    import mlflow
    import pandas as pd

    from pipeline.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(paths.tracking_uri))
    mlflow.set_experiment("igfiqa-study")
    frame = pd.DataFrame(summary["runs"])
    numeric = frame.select_dtypes("number").drop(columns=["seed"], errors="ignore")
    with mlflow.start_run(run_name="study-summary") as active:
        mlflow.log_params(
            {"epochs": spec.epochs, "seeds": str(list(spec.seeds)), "fmrs": str(list(spec.fmr))}
        )
        mlflow.set_tags({f"run.{n}": i for n, i in zip(frame["run"], frame["mlflow_run_id"])})
        metrics = {}
        for group, rows in numeric.groupby(frame["group"]):
            slug = group.replace(" ", "_").replace("(", "").replace(")", "").replace("α", "alpha")
            for column, value in rows.mean().items():
                if pd.notna(value):
                    metrics[f"{slug}.{column}"[:250]] = float(value)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(paths.report), artifact_path="report")
        return active.info.run_id


@contextlib.contextmanager
def _study_lock(paths: StudyPaths) -> Iterator[None]:
    """An exclusive lock on OUT/.study.lock (released when the process ends, even killed)."""
    paths.out.mkdir(parents=True, exist_ok=True)
    with open(paths.out / ".study.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _init_tracking_store(paths: StudyPaths) -> None:
    """Create the sqlite MLflow store once: two processes migrating a new database at once collide."""
    import mlflow

    mlflow.MlflowClient(paths.tracking_uri).search_experiments(max_results=1)


def parse_args(argv: list[str] | None) -> tuple[StudySpec, argparse.Namespace]:
    """The study's spec (from the options that set it, checked by the typed loader) and the options
    of this call: --out, --worker, --docs-img, --no-track."""
    from pipeline.config import ConfigError
    from pipeline.config_loader import config_keys, from_mapping

    parser = argparse.ArgumentParser(
        prog="python -m experiments.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    unset = argparse.SUPPRESS  # an option not given takes StudySpec's default
    parser.add_argument("--out", type=Path, default=Path("work/study"))
    parser.add_argument(
        "--config", default=unset, help=f"(default {Path(StudySpec.config).relative_to(REPO)})"
    )
    parser.add_argument(
        "--epochs", type=int, default=unset, help="train this many epochs (default: the config's schedule)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=unset)
    parser.add_argument("--identities", type=int, default=unset)
    parser.add_argument(
        "--images-per-identity",
        type=int,
        default=unset,
        help=f"as the demo's data (default {StudySpec.images_per_identity})",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=unset,
        help=f"seed of the synthetic data (default {StudySpec.data_seed})",
    )
    parser.add_argument("--fmr", type=float, nargs="+", default=unset)
    parser.add_argument(
        "--extra-fmr",
        type=float,
        default=unset,
        help="also report this FMR (one the small synthetic sets resolve) with a random-quality baseline",
    )
    parser.add_argument(
        "--worker", default="0/1", help="I/N: take every N-th run starting at I (default 0/1)"
    )
    parser.add_argument(
        "--fresh-pairs",
        type=int,
        default=unset,
        help="pairs per fresh verification set of seed data-seed + 1,000,000 (the demo's efficacy "
        f"figures for every run; default {StudySpec.fresh_pairs}, 0 skips)",
    )
    parser.add_argument(
        "--no-alpha-ablation",
        dest="alpha_ablation",
        action="store_false",
        default=unset,
        help="leave out the α ablation's two runs (fixed 0.9, fixed 0.99)",
    )
    parser.add_argument("--docs-img", type=Path, default=None, help="also copy the plots here (docs/img)")
    parser.add_argument("--no-track", action="store_true", help="do not log the summary run to MLflow")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=unset, help="extra config override"
    )
    args = parser.parse_args(argv)
    index, _, count = args.worker.partition("/")
    args.worker_index, args.worker_count = int(index), int(count or 1)
    if not 0 <= args.worker_index < args.worker_count:
        parser.error(f"--worker {args.worker}: need 0 <= I < N")
    try:
        spec = from_mapping(StudySpec, {k: v for k, v in vars(args).items() if k in config_keys(StudySpec)})
        check_spec(spec)
    except ConfigError as exc:
        parser.error(str(exc))
    return spec, args


def main(argv: list[str] | None = None) -> int:
    """Prepare, train and measure this worker's runs; write the report once every run is measured."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec, args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from experiments.study_measure import load_training_images

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    paths = StudyPaths(args.out)
    started = time.monotonic()
    with _study_lock(paths):  # workers started together: one prepares the data and the MLflow store
        prepare_data(
            paths,
            SynthSpec(
                identities=spec.identities, images_per_identity=spec.images_per_identity, seed=spec.data_seed
            ),
        )
        _init_tracking_store(paths)
        fresh = None
        if spec.fresh_pairs:
            from jobs.stages.efficacy import fresh_seed
            from pipeline.evaluation.efficacy import make_fresh_sets

            fresh = make_fresh_sets(paths.out / "fresh", fresh_seed(spec.data_seed), pairs=spec.fresh_pairs)
    runs = study_runs(spec.seeds, alpha_ablation=spec.alpha_ablation)
    mine = runs[args.worker_index :: args.worker_count]
    images = load_training_images(paths.train, paths.synth, progress=False)
    fmrs = spec.fmr
    for run in mine:
        config = run_config(run, paths, spec)
        outcome = train_run(run, config)
        measure(run, config, paths, images, fmrs, outcome, fresh)
    missing = [r.name for r in runs if not (paths.runs / r.name / MEASUREMENT_FILE).is_file()]
    if missing:
        log.info(
            "worker %s done in %.0f s; waiting for runs %s before the report",
            args.worker,
            time.monotonic() - started,
            missing,
        )
        return 0
    summary = write_report(paths, runs, spec, images, args.docs_img)
    if not args.no_track:
        run_id = log_summary_run(paths, spec, summary)
        log.info("summary logged to MLflow run %s (%s)", run_id, paths.tracking_uri)
    log.info("report in %s (%.0f s in this call)", paths.report, time.monotonic() - started)
    print(json.dumps({"report": str(paths.report), "seconds": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
