"""Does a trained model do its job? Its figures on FRESH synthetic verification sets.

`make_fresh_sets` writes clean.bin and mixed.bin of a seed (`data_prep.synth.synthesize_verification`:
identities never seen in training when the seed differs from the training data's) and converts them
like `igfiqa prep bins`; `measure` scores them with a model through
`pipeline.evaluation.evaluate.evaluate_set` (own backbone unless the options name an FR model;
10-fold accuracy, EDC at one fixed FMR) and gives:

- clean and mixed verification accuracy;
- Spearman's rho between predicted quality and the known degradation strength on the mixed set
  (negative is right: stronger degradation, lower quality);
- the mixed set's EDC pAUC (FMR `fmr`, discard <= `discard_limit`) divided by the mean pAUC of
  `permutations` random permutations of the same scores (below 1: quality ranks failures first);
- the same ratio for the oracle, quality = -strength, against the same random reference: how much
  quality CAN matter on this data (well below 1 when degraded images fail verification more often).

How it measures is one `EvalOptions` (`EFFICACY_OPTIONS` unless the caller gives others): one
forward pass per image by default; with `flip`, each image with its mirror image too (the
secondary protocol, `pipeline.evaluation.mirror`), and every result says which (`Efficacy.flip`).

`measure_checkpoint` does the same for a training checkpoint file.

Used by the demo's efficacy stage (`jobs.stages.efficacy`), the study and `experiments/efficacy.py`.
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
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.quality_metrics import evaluate_quality
from pipeline.method.model import load_inference_model
from pipeline.parallel.env import resolve_device

DEFAULT_PAIRS = 2000
DEFAULT_IDENTITIES = 400
DEFAULT_FMR = 1e-2  # 2,000 pairs hold ~1,000 non-mated ones: FMR 1e-2 rests on ~10 false matches
# The figures at one FMR the sets resolve, on the CPU (the same figures on any machine), quietly;
# flip, discard limit and permutations are EvalOptions' defaults.
EFFICACY_OPTIONS = EvalOptions(fmrs=(DEFAULT_FMR,), device="cpu", progress=False)
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
    flip: bool  # each image scored with its mirror image too (the secondary protocol)

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


def efficacy_fmr(options: EvalOptions) -> float:
    """The one FMR of the figures (`options.fmrs` must hold exactly one)."""
    if options.fmrs is None or len(options.fmrs) != 1:
        raise ValueError(f"the efficacy figures are measured at one FMR; the options give {options.fmrs}")
    return options.fmrs[0]


def edc_ratios(
    pairs: pd.DataFrame,
    quality: pd.Series,
    strength: pd.Series,
    options: EvalOptions = EFFICACY_OPTIONS,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """EDC pAUC of `quality`, of the oracle (−strength) and the mean of random permutations of `quality`.

    `pairs` has left, right, similarity, mated; `quality` and `strength` are indexed by image key;
    FMR, discard limit and the number of permutations come from `options`.
    """
    rng = np.random.default_rng(seed)
    keys = quality.index.astype(str)
    values = quality.to_numpy(np.float64)
    columns: dict[str, np.ndarray] = {MODEL: values, ORACLE: -strength.reindex(keys).to_numpy(np.float64)}
    randoms = [f"random_{i}" for i in range(options.permutations)]
    for name in randoms:
        columns[name] = rng.permutation(values)
    scores = pd.DataFrame({"image": keys, **columns})
    evaluation = evaluate_quality(
        pairs, scores, dataset="mixed", fmrs=(efficacy_fmr(options),), discard_limit=options.discard_limit
    )
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


def measure(model: torch.nn.Module, sets: FreshSets, options: EvalOptions = EFFICACY_OPTIONS) -> Efficacy:
    """Score both sets with `model` (eval mode, on `options.device`) and compute every figure."""
    fmr = efficacy_fmr(options)
    model = model.to(resolve_device(options.device)).eval()
    results = {}
    for name in VERIFICATION_SETS:
        vset = load_verification_set(sets.val / name)
        results[name] = evaluate_set(model, vset, options, method=MODEL)
    mixed = results["mixed"]
    quality = pd.Series(mixed.scores[MODEL].to_numpy(np.float64), index=mixed.scores["image"].astype(str))
    strength = strength_by_key(sets.val / "mixed", sets.synth / "mixed_ground_truth.parquet")
    ratios = edc_ratios(mixed.pairs, quality, strength, options, seed=sets.seed)
    rho = float(spearmanr(quality.to_numpy(), strength.reindex(quality.index).to_numpy()).statistic)
    return Efficacy(
        seed=sets.seed,
        pairs=len(mixed.pairs),
        clean_accuracy=results["clean"].verification.accuracy,
        mixed_accuracy=mixed.verification.accuracy,
        mixed_spearman=rho,
        fmr=fmr,
        discard_limit=options.discard_limit,
        permutations=options.permutations,
        flip=options.flip,
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
    checkpoint: Path, sets: FreshSets, options: EvalOptions = EFFICACY_OPTIONS
) -> Efficacy:
    """`measure` for a training checkpoint (loaded on `options.device`, as `igfiqa eval` loads it)."""
    model, _ = load_inference_model(checkpoint, resolve_device(options.device))
    return measure(model, sets, options)
