"""The efficacy stage: does the trained model do its job on verification sets it never saw?

Fresh synthetic clean/mixed sets of another seed than the training data's (identities never
trained on, `pipeline.evaluation.efficacy`) go to `<out>/fresh-seed-<seed>/`; the model's figures
(clean accuracy, Spearman(quality, degradation strength), EDC pAUC ratio to random quality and the
oracle's) go to `<eval>/<label>-efficacy.json` and, as `fresh.*` metrics, to the given MLflow
runs (the demo's evaluation and training runs). The demo and the study measure with test-time
flip (`efficacy_options`), the secondary protocol, and the figures say so (`flip`). A later call
with the same checkpoint, seed, pairs and flip reuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobs.stages.train import TrainOutcome
from jobs.stages.work import StageRecord, WorkFolder, marker_name, read_json_object, write_json_atomically

if TYPE_CHECKING:
    from pipeline.evaluation.options import EvalOptions

# Fresh sets use the training seed + this offset: a seed never trained on, and not the one the
# recipe was tuned on (1001, see docs/reproduction.md).
FRESH_SEED_OFFSET = 1_000_000


def fresh_seed(training_seed: int) -> int:
    """The seed of the fresh verification sets of data synthesised with `training_seed`."""
    return training_seed + FRESH_SEED_OFFSET


def efficacy_options() -> EvalOptions:
    """How the demo and the study measure: the efficacy protocol with test-time flip, as face
    verification is usually reported (embeddings summed, quality averaged)."""
    from dataclasses import replace

    from pipeline.evaluation.efficacy import EFFICACY_OPTIONS

    return replace(EFFICACY_OPTIONS, flip=True)


def efficacy_stage(
    paths: WorkFolder,
    trained: TrainOutcome,
    record: StageRecord,
    *,
    seed: int,
    label: str,
    run_ids: list[str] | None = None,
    pairs: int | None = None,
) -> dict[str, float]:
    """The model's figures on fresh sets of `seed` (see the module docstring); reused when recorded."""
    from pipeline.evaluation.efficacy import DEFAULT_PAIRS, make_fresh_sets, measure_checkpoint

    options = efficacy_options()
    pairs = pairs or DEFAULT_PAIRS
    marker = paths.eval / marker_name(label, "efficacy")
    recorded = read_json_object(marker)
    if (
        recorded is not None
        and recorded.get("checkpoint") == trained.checkpoint
        and recorded.get("seed") == seed
        and recorded.get("pairs") == pairs
        and recorded.get("flip") == options.flip
        and isinstance(recorded.get("figures"), dict)
    ):
        record.reused, record.note = True, f"seed {seed} already measured"
        return {k: float(v) for k, v in recorded["figures"].items()}

    sets = make_fresh_sets(paths.out / "fresh", seed, pairs=pairs, progress=True)
    figures = measure_checkpoint(Path(trained.checkpoint), sets, options).figures()
    for run_id in run_ids or []:
        _log_figures(paths.tracking_uri, run_id, figures, trained.global_step)
    write_json_atomically(
        marker,
        {
            "checkpoint": trained.checkpoint,
            "seed": seed,
            "pairs": pairs,
            "flip": options.flip,
            "figures": figures,
        },
    )
    record.note = (
        f"seed {seed}: clean acc {figures['clean_accuracy']:.3f}, Spearman {figures['mixed_spearman']:+.2f}, "
        f"EDC ratio {figures['edc_ratio']:.2f} (oracle {figures['oracle_ratio']:.2f})"
    )
    return figures


def _log_figures(tracking_uri: str, run_id: str, figures: dict[str, float], step: int) -> None:
    """The figures as `fresh.<name>` metrics (and the seed as a tag) of one MLflow run."""
    from pipeline.tracking.store import RunTracker

    tracker = RunTracker(tracking_uri, run_id)
    tracker.log_metrics({f"fresh.{name}": value for name, value in figures.items()}, step=step)
    tracker.set_tags({"fresh.seed": int(figures["seed"])})


def efficacy_lines(figures: dict[str, float]) -> list[str]:
    """The SUMMARY's lines: accuracy, Spearman and EDC ratio, the oracle's ratio, and which protocol."""
    return [
        f"on fresh sets of seed {int(figures['seed'])} ({int(figures['pairs'])} pairs each, identities never "
        "trained on"
        + ("; each image scored with its mirror image, flip" if figures.get("flip") else "")
        + "):",
        f"  clean verification accuracy       {100 * figures['clean_accuracy']:6.2f} %",
        f"  Spearman(quality, degradation)    {figures['mixed_spearman']:+.3f}   (mixed set; -1 is ideal)",
        f"  EDC pAUC / random quality         {figures['edc_ratio']:.3f}    "
        f"(FMR {figures['fmr']:g}, discard <= {figures['discard_limit']:g}; "
        f"mean of {int(figures['permutations'])} permutations = 1)",
        f"  oracle (quality = -strength)      {figures['oracle_ratio']:.3f}    (what the data allows)",
    ]
