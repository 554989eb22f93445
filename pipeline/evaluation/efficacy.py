"""Does a trained model do its job? Its figures on FRESH synthetic verification sets.

`make_fresh_sets` writes clean.bin and mixed.bin of a seed (`data_prep.synth.synthesize_verification`:
identities never seen in training when the seed differs from the training data's) and converts them
like `igfiqa prep bins`; `measure` scores them with a model's own backbone and quality head through
`pipeline.evaluation.evaluate.evaluate_set` (10-fold accuracy, EDC at a fixed FMR) and gives:

- clean and mixed verification accuracy;
- Spearman's rho between predicted quality and the known degradation strength on the mixed set
  (negative is right: stronger degradation, lower quality);
- the mixed set's EDC pAUC (FMR `fmr`, discard <= `discard_limit`) divided by the mean pAUC of
  `permutations` random permutations of the same scores (below 1: quality ranks failures first);
- the same ratio for the oracle, quality = -strength, against the same random reference: how much
  quality CAN matter on this data (well below 1 when degraded images fail verification more often).

By default every image is scored with its mirror image too (`flip`, InsightFace's test-time flip:
embeddings summed, qualities averaged), as face verification is usually measured.

`measure_checkpoint` does the same for a training checkpoint file.

Used by the demo's efficacy stage (`jobs.stages.efficacy`) and `experiments/efficacy.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from data_prep.bins import convert_bins
from data_prep.manifest import read_manifest
from data_prep.synth import (
    VERIFICATION_SETS,
    default_synth_workers,
    generator_settings,
    synthesize_verification,
)
from pipeline.evaluation.evaluate import evaluate_set, load_verification_set
from pipeline.evaluation.quality_metrics import evaluate_quality
from pipeline.method.model import load_inference_model

DEFAULT_PAIRS = 2000
DEFAULT_IDENTITIES = 400
DEFAULT_PERMUTATIONS = 20
DEFAULT_FMR = 1e-2
DEFAULT_DISCARD_LIMIT = 0.2
# Test-time flip (embedding + mirror's embedding, mean quality) since 2026-11-30 evening: on six
# model × seed pairs it lowered the EDC ratio by 0.021-0.086 (mean 0.037) and the oracle's by
# 0-0.05 (docs/reproduction.md); figures measured before then are without it.
DEFAULT_FLIP = True
MODEL, ORACLE = "model", "oracle"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreshSets:
    """Synthetic verification sets of one seed: the .bin files with ground truth, and their conversion."""

    synth: Path  # clean.bin, mixed.bin, <set>_ground_truth.parquet
    val: Path  # <set>/ as `igfiqa prep bins` writes it
    seed: int


@dataclass(frozen=True)
class Efficacy:
    """The figures of one model on one seed's sets (see the module docstring)."""

    seed: int
    pairs: int
    clean_accuracy: float
    mixed_accuracy: float
    mixed_spearman: float
    edc_pauc: float
    random_pauc_mean: float
    edc_ratio: float
    oracle_pauc: float
    oracle_ratio: float
    fnmr: float  # mixed set, FNMR at the FMR threshold with nothing discarded
    fmr: float
    discard_limit: float
    permutations: int
    flip: bool  # each image scored with its mirror image too (see `measure`)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (the JSON line)."""
        return asdict(self)

    def figures(self) -> dict[str, float]:
        """Every field as a float (for MLflow metrics and JSON records)."""
        return {k: float(v) for k, v in self.as_dict().items()}


def make_fresh_sets(
    work: Path,
    seed: int,
    *,
    pairs: int = DEFAULT_PAIRS,
    identities: int = DEFAULT_IDENTITIES,
    progress: bool = False,
) -> FreshSets:
    """Generate and convert the verification sets of `seed` under WORK/seed-<seed>/, reusing finished ones.

    Sets that an earlier generator made (other `data_prep.synth.generator_settings()`) are made
    again: they are a function of the seed and the code, and figures on them would be figures of
    other data.
    """
    root = Path(work) / f"seed-{seed}"
    synth, val = root / "synth", root / "val"
    wanted = {"seed": seed, "verification_pairs": pairs, "verification_identities": identities}
    settings_path = synth / "synth.json"
    if settings_path.is_file():
        existing = json.loads(settings_path.read_text())
        if any(existing.get(k) != v for k, v in wanted.items()):
            raise ValueError(f"{synth} holds sets of other settings than {wanted}; use another --work")
        if existing.get("generator") != generator_settings():
            log.warning(
                "%s: sets of an earlier generator (%s); making them again", synth, existing.get("generator")
            )
            shutil.rmtree(root)
    if not settings_path.is_file():
        synthesize_verification(
            synth,
            identities=identities,
            pairs=pairs,
            seed=seed,
            progress=progress,
            workers=default_synth_workers(),
        )
    return FreshSets(synth, convert_sets(synth, val, progress=progress), seed)


def convert_sets(synth: Path, val: Path, *, progress: bool = False) -> Path:
    """Convert SYNTH/<set>.bin into VAL/<set>/ (kept when already converted); returns VAL."""
    convert_bins([Path(synth) / f"{name}.bin" for name in VERIFICATION_SETS], Path(val), progress=progress)
    return Path(val)


def strength_by_key(val_set: Path, truth_path: Path) -> pd.Series:
    """Known degradation strength of every image of a converted set, indexed by manifest key."""
    manifest = read_manifest(val_set)[["key", "index"]]
    truth = pd.read_parquet(truth_path)[["index", "strength"]]
    joined = manifest.merge(truth, on="index", how="left", validate="one_to_one")
    if joined["strength"].isna().any():
        raise ValueError(f"{truth_path}: no ground truth for some images of {val_set}")
    return pd.Series(joined["strength"].to_numpy(np.float64), index=joined["key"].astype(str))


def edc_ratios(
    pairs: pd.DataFrame,
    quality: pd.Series,
    strength: pd.Series,
    *,
    fmr: float = DEFAULT_FMR,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> dict[str, float]:
    """EDC pAUC of `quality`, of the oracle (−strength) and the mean of random permutations of `quality`.

    `pairs` has left, right, similarity, mated; `quality` and `strength` are indexed by image key.
    """
    rng = np.random.default_rng(seed)
    keys = quality.index.astype(str)
    values = quality.to_numpy(np.float64)
    columns: dict[str, np.ndarray] = {MODEL: values, ORACLE: -strength.reindex(keys).to_numpy(np.float64)}
    randoms = [f"random_{i}" for i in range(permutations)]
    for name in randoms:
        columns[name] = rng.permutation(values)
    scores = pd.DataFrame({"image": keys, **columns})
    evaluation = evaluate_quality(pairs, scores, dataset="mixed", fmrs=(fmr,), discard_limit=discard_limit)
    pauc = {r.method: r.edc_pauc for r in evaluation.results}
    model_curve = next(r for r in evaluation.results if r.method == MODEL).edc
    random_mean = float(np.mean([pauc[name] for name in randoms]))
    return {
        "edc_pauc": pauc[MODEL],
        "random_pauc_mean": random_mean,
        "edc_ratio": pauc[MODEL] / random_mean if random_mean > 0 else float("nan"),
        "oracle_pauc": pauc[ORACLE],
        "oracle_ratio": pauc[ORACLE] / random_mean if random_mean > 0 else float("nan"),
        "fnmr": float(model_curve.fnmr[0]),
    }


def measure(
    model: torch.nn.Module,
    sets: FreshSets,
    *,
    fmr: float = DEFAULT_FMR,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    permutations: int = DEFAULT_PERMUTATIONS,
    flip: bool = DEFAULT_FLIP,
    device: torch.device | None = None,
) -> Efficacy:
    """Score both sets with `model` (eval mode, own backbone) and compute every figure.

    `flip`: embeddings are the image's plus its mirror image's, quality the mean of both
    (`pipeline.evaluation.scoring.infer_batch`), for both sets and every figure.
    """
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    results = {}
    for name in VERIFICATION_SETS:
        vset = load_verification_set(sets.val / name)
        results[name] = evaluate_set(
            model,
            vset,
            method=MODEL,
            device=device,
            flip=flip,
            fmrs=(fmr,),
            discard_limit=discard_limit,
            progress=False,
        )
    mixed = results["mixed"]
    quality = pd.Series(mixed.scores[MODEL].to_numpy(np.float64), index=mixed.scores["image"].astype(str))
    strength = strength_by_key(sets.val / "mixed", sets.synth / "mixed_ground_truth.parquet")
    ratios = edc_ratios(
        mixed.pairs,
        quality,
        strength,
        fmr=fmr,
        discard_limit=discard_limit,
        permutations=permutations,
        seed=sets.seed,
    )
    rho = float(spearmanr(quality.to_numpy(), strength.reindex(quality.index).to_numpy()).statistic)
    return Efficacy(
        seed=sets.seed,
        pairs=len(mixed.pairs),
        clean_accuracy=results["clean"].verification.accuracy,
        mixed_accuracy=mixed.verification.accuracy,
        mixed_spearman=rho,
        fmr=fmr,
        discard_limit=discard_limit,
        permutations=permutations,
        flip=flip,
        **ratios,
    )


def format_report(result: Efficacy) -> str:
    """Human-readable lines of the figures."""
    return "\n".join(
        [
            f"fresh sets of seed {result.seed}, {result.pairs} pairs each"
            + (", each image scored with its mirror image (flip)" if result.flip else ""),
            f"  clean accuracy        {100 * result.clean_accuracy:6.2f} %",
            f"  mixed accuracy        {100 * result.mixed_accuracy:6.2f} %",
            f"  Spearman(q, strength) {result.mixed_spearman:+.3f}  (mixed set)",
            f"  FNMR @ FMR {result.fmr:g}     {result.fnmr:.3f}  (mixed set, nothing discarded)",
            f"  EDC pAUC ratio        {result.edc_ratio:.3f}  "
            f"({result.edc_pauc:.4f} / random {result.random_pauc_mean:.4f}, discard <= {result.discard_limit})",
            f"  oracle pAUC ratio     {result.oracle_ratio:.3f}  ({result.oracle_pauc:.4f}, quality = -strength)",
        ]
    )


def measure_checkpoint(
    checkpoint: Path,
    sets: FreshSets,
    *,
    fmr: float = DEFAULT_FMR,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    permutations: int = DEFAULT_PERMUTATIONS,
    flip: bool = DEFAULT_FLIP,
) -> Efficacy:
    """`measure` for a training checkpoint (loaded on the CPU as `igfiqa eval` loads it)."""
    model, _ = load_inference_model(checkpoint, torch.device("cpu"))
    return measure(model, sets, fmr=fmr, discard_limit=discard_limit, permutations=permutations, flip=flip)
