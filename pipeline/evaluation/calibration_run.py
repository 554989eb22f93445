"""`igfiqa calibrate` below its parsing: a model and a matcher over identity-labelled sets → calibration.json.

Each set's images pass once through the model (raw quality) and the matcher (embeddings); each
set's all-vs-all comparisons (`pipeline.evaluation.all_pairs`, the non-mated pairs capped as
`igfiqa eval` does) give every image's failed and mated comparisons at ONE threshold, set at the
FMR on the non-mated comparisons of all the sets together (the threshold a deployment of this
matcher would use). The fit is `pipeline.evaluation.calibration.fit_calibration`; identities of
different sets are kept apart. Written atomically to OUT: calibration.json (the map and
everything behind it: matcher and data fingerprints, FMR and threshold, comparisons per piece,
bands, the held-out reliability table, ECE) and reliability.png.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.atomic import atomic_write, atomic_write_json
from data_prep.calibration_map import (
    CALIBRATION_FILE,
    SCORE_DEFINITION,
    CalibrationMap,
)
from data_prep.dataset import dataset_fingerprint
from data_prep.errors import DataError
from pipeline.evaluation.all_pairs import all_pairs
from pipeline.evaluation.calibration import CalibrationFit, fit_calibration, image_mated_errors
from pipeline.evaluation.calibration_plot import plot_reliability
from pipeline.evaluation.embeddings import load_matchers
from pipeline.evaluation.evaluate import embed_set, find_evaluation_sets, load_evaluation_set
from pipeline.evaluation.identity_sets import IdentitySet
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.quality_metrics import MIN_FALSE_MATCHES, threshold_at_fmr
from pipeline.method.model import model_fingerprint

log = logging.getLogger(__name__)

RELIABILITY_PLOT = "reliability.png"


@dataclass(frozen=True)
class CalibrationOutcome:
    """What `calibrate_model` wrote and the numbers a person reads first."""

    json_path: Path
    plot_path: Path
    map: CalibrationMap
    fit: CalibrationFit
    threshold: float
    num_nonmated: int


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity_sets(data: Sequence[Path]) -> list[IdentitySet]:
    """The identity-labelled sets under each --data folder; DataError naming a set without identity labels."""
    sets = []
    for folder in data:
        for path in find_evaluation_sets(folder):
            loaded = load_evaluation_set(path)
            if not isinstance(loaded, IdentitySet):
                raise DataError(
                    "a verification set (a pairs list, no identity labels): --data needs identity-labelled "
                    "sets (`igfiqa prep convert` of a RecordIO dataset or an image folder ROOT/<identity>/*)",
                    path=path,
                )
            sets.append(loaded)
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise DataError(f"--data names two sets of one name among {names}: give each set once")
    return sets


def calibrate_model(
    model: torch.nn.Module,
    data: Sequence[Path],
    out: Path,
    options: EvalOptions,
    *,
    fmr: float,
    holdout: float,
    bootstrap: int,
    seed: int,
    provenance: dict[str, Any],
) -> CalibrationOutcome:
    """Fit the calibration of `model` on the sets under `data` by the one ONNX matcher of `options`;
    write OUT/calibration.json and OUT/reliability.png (module docstring). `provenance`: the
    checkpoint, its training run and step, recorded under "model"."""
    if len(options.fr_models) != 1:
        raise DataError(f"--fr-model: give exactly one matcher ONNX model (got {len(options.fr_models)})")
    matcher_path = options.fr_models[0]
    if not matcher_path.is_file():
        raise DataError("no such matcher ONNX model (--fr-model)", path=matcher_path)
    sets = identity_sets(data)
    (matcher,) = [m for m in load_matchers(options) if m.source is not None]
    qualities, labels, failed, mated, nonmated, comparisons = [], [], [], [], [], []
    label_offset = 0
    for iset in sets:
        embedded = embed_set(
            model, iset.images(options.batch_size), len(iset.manifest), iset.name, options, [matcher]
        )
        pairs = all_pairs(
            embedded.by_matcher[matcher.name],
            iset.labels,
            nonmated_sample_cap=options.nonmated_sample_cap,
            seed=options.nonmated_sample_seed,
        )
        comparisons.append(pairs)
        nonmated.append(pairs.comparisons.similarity[~pairs.comparisons.mated])
        qualities.append(embedded.quality.astype(np.float64))
        labels.append(iset.labels + label_offset)
        label_offset += int(iset.labels.max()) + 1
    all_nonmated = np.concatenate(nonmated)
    if fmr * all_nonmated.size < MIN_FALSE_MATCHES:
        raise DataError(
            f"--fmr {fmr:g}: {all_nonmated.size:,} non-mated comparisons give {fmr * all_nonmated.size:.1f} "
            f"false matches at that FMR, fewer than {MIN_FALSE_MATCHES}: the threshold would be noise; use a "
            f"larger --fmr (at least {MIN_FALSE_MATCHES / max(all_nonmated.size, 1):.2g}) or more identities"
        )
    threshold = threshold_at_fmr(all_nonmated, fmr)
    for pairs in comparisons:
        f, m = image_mated_errors(pairs.comparisons, threshold.value)
        failed.append(f)
        mated.append(m)
    fit = fit_calibration(
        np.concatenate(qualities),
        np.concatenate(labels),
        np.concatenate(failed),
        np.concatenate(mated),
        holdout=holdout,
        bootstrap=bootstrap,
        seed=seed,
    )
    calibration = CalibrationMap(
        quality=tuple(fit.knots_quality.tolist()),
        expected_fnmr=tuple(fit.knots_fnmr.tolist()),
        fmr=fmr,
        threshold=threshold.value,
        matcher=matcher.name,
        matcher_sha256=file_sha256(matcher_path),
        model_fingerprint=model_fingerprint(model),
    )
    document = {
        "map": calibration.to_json_dict(),
        "target": (
            "expected FNMR of an image's mated comparisons: the fraction of its comparisons with the other "
            "images of its identity whose similarity is at or below the threshold (a mated pair counts for "
            "both its images; groups are weighted by their mated comparisons)"
        ),
        "quality_score": SCORE_DEFINITION,
        "fmr": fmr,
        "threshold": threshold.value,
        "achieved_fmr": threshold.achieved_fmr,
        "nonmated_comparisons": int(all_nonmated.size),
        "mated_comparisons": int(sum(p.comparisons.num_mated for p in comparisons)),
        "matcher": {"name": matcher.name, "path": str(matcher_path), "sha256": calibration.matcher_sha256},
        "model": {"fingerprint": calibration.model_fingerprint, **provenance},
        "data": [
            {
                "name": iset.name,
                "path": str(iset.info.root),
                "fingerprint": dataset_fingerprint(iset.info.root),
                "images": len(iset.manifest),
                "identities": int(np.unique(iset.labels).size),
                **pairs.description(),
            }
            for iset, pairs in zip(sets, comparisons, strict=True)
        ],
        "split": fit.split,
        "blocks": fit.blocks,
        "bands": fit.bands,
        "reliability": fit.reliability,
        "ece": fit.ece,
        "flip": options.flip,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / RELIABILITY_PLOT
    atomic_write(
        plot_path, lambda tmp: plot_reliability(fit, tmp, title=calibration.describe()), durable=False
    )
    json_path = out / CALIBRATION_FILE
    atomic_write_json(json_path, document)
    return CalibrationOutcome(json_path, plot_path, calibration, fit, threshold.value, int(all_nonmated.size))
