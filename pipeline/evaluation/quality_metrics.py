"""Quality evaluation of a FIQA method: EDC (ISO/IEC 29794-1) and the FIQA papers' ERC AUC.

Inputs are comparison pairs (`similarity`, higher = more alike; `mated` 0/1) and a
quality score per image; a pair's quality is the minimum of its two images' qualities.
A comparison matches when its similarity is strictly greater than τ, fixed once on all
pairs at the target FMR (when FMR·N_non-mated < 1 no threshold reaches it: τ is the
highest non-mated similarity and the result carries a warning). `edc` discards mated
pairs lowest quality first, ties together, and integrates stepwise to a discard limit;
`paper_erc` rejects the lowest ⌊r·N⌋ of all pairs for r = 0…0.95 and integrates by
trapezoids (`refit_threshold=True` reproduces the published CR-FIQA script). Exact
definitions and how CR-FIQA's script differs: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_FMRS = (1e-3, 1e-4)  # the paper's; kept where a set resolves them (`resolvable_fmrs`)
MIN_FALSE_MATCHES = 10  # an FMR is measured when at least this many non-mated pairs lie above τ
DEFAULT_DISCARD_LIMIT = 0.2
RANDOM_METHOD = "random"  # the random-quality reference every evaluation carries
DEFAULT_RANDOM_DRAWS = 20
PAPER_REJECT_STEP = 0.05
PAPER_REJECT_POINTS = 20  # r = 0, 0.05, …, 0.95
# FMR·N is floored with this relative slack so that 0.29·100 (= 28.999999999999996) gives 29.
_FLOOR_SLACK = 1e-12


class QualityEvalError(ValueError):
    """Input that cannot be evaluated; the message names the file, the rows and what is wrong."""


# --------------------------------------------------------------------------- threshold


@dataclass(frozen=True)
class Threshold:
    """A similarity threshold set on the non-mated pairs; a comparison matches when similarity > value."""

    fmr_target: float
    value: float
    achieved_fmr: float
    num_nonmated: int
    below_resolution: bool  # FMR·N < 1: no threshold can reach the target

    def warning(self) -> str | None:
        """A sentence for the report when the target FMR is not reachable or barely resolved, else None."""
        if not self.below_resolution:
            false_matches = self.fmr_target * self.num_nonmated
            if false_matches < MIN_FALSE_MATCHES:
                return (
                    f"FMR {self.fmr_target:g} rests on {false_matches:.1f} false matches of "
                    f"{self.num_nonmated} non-mated pairs (fewer than {MIN_FALSE_MATCHES}): a noisy figure"
                )
            return None
        return (
            f"FMR {self.fmr_target:g} is below the resolution 1/{self.num_nonmated} of the non-mated pairs: "
            f"no threshold reaches it; the threshold is the highest non-mated similarity "
            f"({self.value:.6g}, achieved FMR 0), so curves at this FMR do not measure FMR {self.fmr_target:g}"
        )


def resolvable_fmrs(num_nonmated: int, wanted: Sequence[float] = DEFAULT_FMRS) -> list[float]:
    """The FMRs of `wanted` that `num_nonmated` pairs resolve (FMR·N ≥ MIN_FALSE_MATCHES); when none
    does, the smallest power of ten that is resolved (at most 0.1), e.g. 1e-1 for 150 pairs,
    1e-2 for LFW's 3,000."""
    kept = [fmr for fmr in wanted if fmr * num_nonmated >= MIN_FALSE_MATCHES * (1 - _FLOOR_SLACK)]
    if kept:
        return kept
    decade = 1
    while 10.0 ** -(decade + 1) * num_nonmated >= MIN_FALSE_MATCHES * (1 - _FLOOR_SLACK):
        decade += 1
    return [10.0**-decade]


def _check_fmr(fmr: float) -> None:
    if not (isinstance(fmr, int | float) and math.isfinite(fmr) and 0.0 < fmr < 1.0):
        raise QualityEvalError(f"FMR target {fmr!r} must lie strictly between 0 and 1")


def threshold_at_fmr(nonmated_similarity: np.ndarray, fmr: float) -> Threshold:
    """The lowest threshold whose FMR on `nonmated_similarity` does not exceed `fmr` (see module doc)."""
    _check_fmr(fmr)
    scores = np.sort(np.asarray(nonmated_similarity, dtype=np.float64))[::-1]
    n = scores.size
    if n == 0:
        raise QualityEvalError("no non-mated pairs: an FMR threshold cannot be set")
    allowed = math.floor(fmr * n * (1.0 + _FLOOR_SLACK))
    value = float(scores[allowed])  # allowed < n because fmr < 1
    achieved = float(np.count_nonzero(scores > value)) / n
    return Threshold(fmr, value, achieved, n, below_resolution=allowed == 0)


# --------------------------------------------------------------------------- EDC (ISO/IEC 29794-1)


@dataclass(frozen=True)
class EDCCurve:
    """FNM-EDC: FNMR of the mated pairs that remain after discarding the lowest-quality ones."""

    discard_fraction: np.ndarray  # of mated pairs, one point per distinct quality level, then 1.0
    fnmr: np.ndarray
    quality_cutoff: np.ndarray  # pairs with quality below this were discarded (NaN for the closing point)
    num_mated: int

    def pauc(self, discard_limit: float) -> float:
        """Stepwise (left-constant) area under the curve from 0 to `discard_limit`."""
        return edc_pauc(self.discard_fraction, self.fnmr, discard_limit)


def edc_curve(
    similarity: np.ndarray, mated: np.ndarray, pair_quality: np.ndarray, threshold: float
) -> EDCCurve:
    """The FNM-EDC of the mated pairs at a fixed threshold; equal qualities are discarded together."""
    similarity, mated, pair_quality = _as_arrays(similarity, mated, pair_quality)
    order = np.argsort(pair_quality[mated], kind="stable")
    quality = pair_quality[mated][order]
    errors = (similarity[mated][order] <= threshold).astype(np.int64)
    n = quality.size
    if n == 0:
        raise QualityEvalError("no mated pairs: FNMR is undefined")
    # errors_from[i] = errors among the pairs i.. (what remains after discarding the first i)
    errors_from = np.concatenate([np.cumsum(errors[::-1])[::-1], [0]])
    level_starts = np.concatenate([[0], np.flatnonzero(quality[1:] != quality[:-1]) + 1])
    remaining = n - level_starts
    discard_fraction = np.append(level_starts / n, 1.0)
    fnmr = np.append(errors_from[level_starts] / remaining, 0.0)
    cutoff = np.append(quality[level_starts], np.nan)
    return EDCCurve(discard_fraction, fnmr, cutoff, n)


def edc_pauc(discard_fraction: np.ndarray, fnmr: np.ndarray, discard_limit: float) -> float:
    """Stepwise integral of an EDC from 0 to `discard_limit` (each FNMR holds until the next point)."""
    if not (0.0 < discard_limit <= 1.0):
        raise QualityEvalError(f"discard limit {discard_limit!r} must lie in (0, 1]")
    x = np.asarray(discard_fraction, dtype=np.float64)
    y = np.asarray(fnmr, dtype=np.float64)
    right = np.minimum(np.append(x[1:], max(1.0, x[-1])), discard_limit)
    widths = np.clip(right - x, 0.0, None)
    return float(np.sum(widths * y))


# --------------------------------------------------------------------------- the papers' ERC


@dataclass(frozen=True)
class PaperERC:
    """FNMR at reject fractions 0…0.95 (step 0.05) and its trapezoidal AUC, as the FIQA papers report it."""

    reject_fraction: np.ndarray
    fnmr: np.ndarray
    thresholds: np.ndarray  # the threshold used at each reject fraction (constant unless refit)
    auc: float
    refit_threshold: bool
    warnings: tuple[str, ...] = ()


def paper_erc(
    similarity: np.ndarray,
    mated: np.ndarray,
    pair_quality: np.ndarray,
    fmr: float,
    *,
    refit_threshold: bool = False,
) -> PaperERC:
    """ERC over all pairs at r = 0, 0.05, …, 0.95 and its trapezoidal AUC.

    `refit_threshold=False` (our paper variant): τ fixed once on all pairs, rejects
    ⌊r·N⌋ pairs (stable order). `True`: reproduces the published CR-FIQA script
    (threshold refit on the remaining pairs by its nearest-FMR rule; see module doc).
    """
    _check_fmr(fmr)
    similarity, mated, pair_quality = _as_arrays(similarity, mated, pair_quality)
    n = similarity.size
    if refit_threshold:
        # The script's grid and rejected counts, float arithmetic included.
        rates = np.arange(0, 0.98, PAPER_REJECT_STEP)
        counts = np.array([int(r * n) for r in rates])
        order = np.argsort(pair_quality)
    else:
        steps = np.arange(PAPER_REJECT_POINTS)
        rates = steps * PAPER_REJECT_STEP
        counts = (steps * n) // PAPER_REJECT_POINTS  # exact ⌊r·N⌋ in integers
        order = np.argsort(pair_quality, kind="stable")
        fixed = threshold_at_fmr(similarity[~mated], fmr).value

    fnmrs, thresholds, warnings = [], [], []
    for rate, count in zip(rates, counts, strict=True):
        kept = order[count:]
        sim_kept, mated_kept = similarity[kept], mated[kept]
        genuine = sim_kept[mated_kept]
        if refit_threshold:
            impostor = sim_kept[~mated_kept]
            if impostor.size == 0:
                warnings.append(
                    f"reject {rate:.2f}: no non-mated pair left to refit the threshold; FNMR is NaN"
                )
                thresholds.append(np.nan)
                fnmrs.append(np.nan)
                continue
            tau = _script_threshold(sim_kept, impostor, fmr)
        else:
            tau = fixed
        thresholds.append(tau)
        if genuine.size == 0:
            warnings.append(f"reject {rate:.2f}: no mated pair left; FNMR taken as 0")
            fnmrs.append(0.0)
        else:
            fnmrs.append(float(np.count_nonzero(genuine <= tau)) / genuine.size)
    fnmr_array = np.asarray(fnmrs, dtype=np.float64)
    # scipy/numpy trapezoid, the same rule as sklearn.metrics.auc in the script
    auc = float(np.trapezoid(fnmr_array, rates))
    return PaperERC(
        np.asarray(rates, dtype=np.float64),
        fnmr_array,
        np.asarray(thresholds),
        auc,
        refit_threshold,
        tuple(warnings),
    )


def _script_threshold(similarity: np.ndarray, nonmated: np.ndarray, fmr: float) -> float:
    """CR-FIQA `get_eer_threshold`: among the observed similarities, the one whose FMR is nearest `fmr`.

    FMR(t) = #{non-mated ≥ t}/N (candidates ascending; argmin takes the first, i.e. lowest, on ties).
    """
    candidates = np.unique(similarity)
    nonmated_sorted = np.sort(nonmated)
    at_or_above = nonmated.size - np.searchsorted(nonmated_sorted, candidates, side="left")
    rates = at_or_above / nonmated.size
    return float(candidates[int(np.argmin(np.abs(rates - fmr)))])


def _as_arrays(similarity: np.ndarray, mated: np.ndarray, pair_quality: np.ndarray) -> tuple[np.ndarray, ...]:
    similarity = np.asarray(similarity, dtype=np.float64)
    mated = np.asarray(mated).astype(bool)
    pair_quality = np.asarray(pair_quality, dtype=np.float64)
    if not (similarity.shape == mated.shape == pair_quality.shape) or similarity.ndim != 1:
        raise QualityEvalError(
            f"similarity {similarity.shape}, mated {mated.shape} and pair quality {pair_quality.shape} "
            "must be 1-D arrays of one length"
        )
    return similarity, mated, pair_quality


# --------------------------------------------------------------------------- tables in, results out


@dataclass(frozen=True)
class MethodResult:
    """One FIQA method at one FMR on one dataset."""

    dataset: str
    method: str
    threshold: Threshold
    edc: EDCCurve
    edc_pauc: float
    discard_limit: float
    erc: PaperERC
    erc_refit: PaperERC | None = None
    reference: MethodResult | None = None  # the random-quality reference on the same pairs and FMR

    def summary(self) -> dict[str, object]:
        """The scalar results, one flat row (for JSON, CSV and MLflow)."""
        row: dict[str, object] = {
            "dataset": self.dataset,
            "method": self.method,
            "fmr": self.threshold.fmr_target,
            "threshold": self.threshold.value,
            "achieved_fmr": self.threshold.achieved_fmr,
            "below_resolution": self.threshold.below_resolution,
            "fnmr_at_0": float(self.edc.fnmr[0]),
            "edc_pauc": self.edc_pauc,
            "discard_limit": self.discard_limit,
            "erc_auc": self.erc.auc,
        }
        if self.erc_refit is not None:
            row["erc_auc_crfiqa_refit"] = self.erc_refit.auc
        if self.reference is not None:
            row["edc_pauc_vs_random"] = _ratio(self.edc_pauc, self.reference.edc_pauc)
            row["erc_auc_vs_random"] = _ratio(self.erc.auc, self.reference.erc.auc)
        return row


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


@dataclass
class QualityEvaluation:
    """Every method × FMR on one dataset, with the warnings the report must show."""

    dataset: str
    num_pairs: int
    num_mated: int
    num_nonmated: int
    results: list[MethodResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.results))

    @property
    def fmrs(self) -> list[float]:
        return list(dict.fromkeys(r.threshold.fmr_target for r in self.results))


PAIR_COLUMNS = ("left", "right", "similarity", "mated")


def validate_pairs(pairs: pd.DataFrame, source: str = "pairs") -> pd.DataFrame:
    """Check the pairs table (left, right, similarity, mated 0/1); returns it with `mated` as bool."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise QualityEvalError(
            f"{source}: missing column(s) {', '.join(missing)} (need {', '.join(PAIR_COLUMNS)}; "
            f"found {', '.join(map(str, pairs.columns))})"
        )
    if len(pairs) == 0:
        raise QualityEvalError(f"{source}: no pairs")
    similarity = pd.to_numeric(pairs["similarity"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(similarity))
    if bad.size:
        raise QualityEvalError(f"{source}: similarity is missing or not a finite number in rows {_rows(bad)}")
    mated_raw = pairs["mated"]
    if mated_raw.dtype == bool:
        mated = mated_raw.to_numpy()
    else:
        values = pd.to_numeric(mated_raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
        if bad.size:
            raise QualityEvalError(f"{source}: mated must be 0 or 1; rows {_rows(bad)} are not")
        mated = values == 1.0
    num_mated = int(mated.sum())
    if num_mated == 0 or num_mated == len(pairs):
        kind = "mated" if num_mated else "non-mated"
        raise QualityEvalError(
            f"{source}: all {len(pairs)} pairs are {kind}; the evaluation needs both mated pairs (for FNMR) "
            "and non-mated pairs (for the FMR threshold)"
        )
    out = pairs.copy()
    out["left"] = out["left"].astype(str)
    out["right"] = out["right"].astype(str)
    out["similarity"] = similarity
    out["mated"] = mated
    return out


def quality_columns(scores: pd.DataFrame, source: str = "scores") -> list[str]:
    """The method columns of a scores table: every numeric column but `image`."""
    if "image" not in scores.columns:
        raise QualityEvalError(
            f"{source}: missing column image (found {', '.join(map(str, scores.columns))})"
        )
    columns = [c for c in scores.columns if c != "image" and pd.api.types.is_numeric_dtype(scores[c])]
    if not columns:
        raise QualityEvalError(f"{source}: no numeric quality column besides image")
    return [str(c) for c in columns]


def _strings(column: pd.Series) -> pa.Array:
    """A column of image keys as an Arrow string array."""
    return pa.array(column.astype(str), type=pa.large_string())


def _positions(names: pd.Series, keys: pa.Array) -> np.ndarray:
    """Row of each name in `keys` (−1 where absent), by hashing."""
    found = pc.index_in(_strings(names), value_set=keys).fill_null(-1)
    return found.to_numpy(zero_copy_only=False).astype(np.int64)


def pair_qualities(
    pairs: pd.DataFrame,
    scores: pd.DataFrame,
    method: str,
    *,
    nan_policy: str = "error",
    source: str = "scores",
) -> tuple[np.ndarray, list[str]]:
    """min(quality[left], quality[right]) for every pair, and warnings.

    Raises for images without a score. NaN scores raise (`nan_policy="error"`) or
    count as the lowest quality, discarded first (`"lowest"`, with a warning).
    """
    if nan_policy not in ("error", "lowest"):
        raise QualityEvalError(f"nan_policy {nan_policy!r} must be 'error' or 'lowest'")
    keys = scores["image"].astype(str)
    duplicated = keys[keys.duplicated()].unique()
    if duplicated.size:
        raise QualityEvalError(f"{source}: image keys listed more than once: {_names(duplicated)}")
    values = pd.to_numeric(scores[method], errors="coerce").to_numpy(np.float64)
    # Arrow's hash lookup (linear in pairs + images): a sort-based set difference on object arrays was
    # quadratic, and pandas' get_indexer on Arrow-backed strings costs ~8 s per million pairs.
    both = pd.concat([pairs["left"], pairs["right"]], ignore_index=True)
    at = _positions(both, _strings(keys))
    left_at, right_at = at[: len(pairs)], at[len(pairs) :]
    warnings: list[str] = []
    if (at < 0).any():
        unscored = pd.unique(both.astype(str).to_numpy()[at < 0])
        raise QualityEvalError(
            f"{source}: {unscored.size} image(s) used by the pairs have no score, e.g. {_names(unscored)}"
        )
    used = np.zeros(len(values), dtype=bool)
    used[left_at] = True
    used[right_at] = True
    used_nan = keys.to_numpy()[used & np.isnan(values)]
    if used_nan.size:
        if nan_policy == "error":
            raise QualityEvalError(
                f"{source}: column {method} is NaN for {used_nan.size} image(s) used by the pairs, e.g. "
                f"{_names(used_nan)} (pass nan_policy='lowest' / --nan-quality lowest to discard them first)"
            )
        warnings.append(
            f"{method}: {used_nan.size} image(s) have no quality score (NaN) and were treated as the lowest "
            f"quality, e.g. {_names(used_nan)}"
        )
    quality = np.minimum(values[left_at], values[right_at])
    quality[np.isnan(quality)] = -np.inf  # only reached with nan_policy="lowest"

    return quality, warnings


def evaluate_quality(
    pairs: pd.DataFrame,
    scores: pd.DataFrame,
    *,
    dataset: str,
    methods: Sequence[str] | None = None,
    fmrs: Sequence[float] | None = None,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    crfiqa_refit: bool = False,
    nan_policy: str = "error",
    pairs_source: str = "pairs",
    scores_source: str = "scores",
    random_draws: int = DEFAULT_RANDOM_DRAWS,
) -> QualityEvaluation:
    """EDC (+ pAUC) and the papers' ERC AUC for every quality method × FMR on one set of pairs.

    `fmrs=None` takes the paper's FMRs where the set resolves them, else the one it resolves
    (`resolvable_fmrs`). Beside the methods, a random-quality reference (method "random": i.i.d.
    uniform image qualities, the mean of `random_draws` draws; 0 leaves it out) is measured on the
    same pairs, and every method's summary carries its ratio to it.
    """
    if not (0.0 < discard_limit <= 1.0):
        raise QualityEvalError(f"discard limit {discard_limit!r} must lie in (0, 1]")
    if fmrs is not None and not fmrs:
        raise QualityEvalError("give at least one FMR target")
    for fmr in fmrs or ():
        _check_fmr(fmr)
    pairs = validate_pairs(pairs, pairs_source)
    available = quality_columns(scores, scores_source)
    methods = list(methods) if methods else available
    unknown = [m for m in methods if m not in scores.columns]
    if unknown:
        raise QualityEvalError(
            f"{scores_source}: no quality column {', '.join(unknown)} (have {', '.join(available)})"
        )
    similarity = pairs["similarity"].to_numpy(np.float64)
    mated = pairs["mated"].to_numpy(bool)
    evaluation = QualityEvaluation(dataset, len(pairs), int(mated.sum()), int((~mated).sum()))
    fmrs = list(fmrs) if fmrs else resolvable_fmrs(evaluation.num_nonmated)
    thresholds = {fmr: threshold_at_fmr(similarity[~mated], fmr) for fmr in fmrs}
    for threshold in thresholds.values():
        if (message := threshold.warning()) is not None:
            evaluation.warnings.append(f"{dataset}: {message}")
    references = (
        {fmr: _random_reference(dataset, pairs, similarity, mated, t, discard_limit, random_draws)
         for fmr, t in thresholds.items()}
        if random_draws > 0
        else {}
    )  # fmt: skip
    for method in methods:
        quality, warnings = pair_qualities(pairs, scores, method, nan_policy=nan_policy, source=scores_source)
        evaluation.warnings.extend(f"{dataset}: {w}" for w in warnings)
        for fmr, threshold in thresholds.items():
            edc = edc_curve(similarity, mated, quality, threshold.value)
            erc = paper_erc(similarity, mated, quality, fmr)
            refit = paper_erc(similarity, mated, quality, fmr, refit_threshold=True) if crfiqa_refit else None
            for curve in (erc, refit):
                if curve is not None:
                    evaluation.warnings.extend(
                        f"{dataset}: {method} FMR {fmr:g}: {w}" for w in curve.warnings
                    )
            evaluation.results.append(
                MethodResult(
                    dataset,
                    method,
                    threshold,
                    edc,
                    edc.pauc(discard_limit),
                    discard_limit,
                    erc,
                    refit,
                    reference=references.get(fmr),
                )
            )
    evaluation.results.extend(references.values())
    return evaluation


def _random_reference(
    dataset: str,
    pairs: pd.DataFrame,
    similarity: np.ndarray,
    mated: np.ndarray,
    threshold: Threshold,
    discard_limit: float,
    draws: int,
) -> MethodResult:
    """The mean EDC and ERC of `draws` i.i.d. uniform image qualities (seeded: the same every run).

    Its EDC is the mean FNMR on a grid of 201 discard fractions; pAUC and AUC are the means of
    the draws' own figures.
    """
    names, image_index = np.unique(
        np.concatenate([pairs["left"].astype(str).to_numpy(), pairs["right"].astype(str).to_numpy()]),
        return_inverse=True,
    )
    left, right = image_index[: len(pairs)], image_index[len(pairs) :]
    rng = np.random.default_rng(20_240_229)
    grid = np.linspace(0.0, 1.0, 201)
    edc_sum, erc_sum, paucs, aucs = np.zeros(grid.size), None, [], []
    for _ in range(draws):
        image_quality = rng.random(names.size)
        quality = np.minimum(image_quality[left], image_quality[right])
        edc = edc_curve(similarity, mated, quality, threshold.value)
        erc = paper_erc(similarity, mated, quality, threshold.fmr_target)
        paucs.append(edc.pauc(discard_limit))
        aucs.append(erc.auc)
        steps = np.searchsorted(edc.discard_fraction, grid, side="right") - 1
        edc_sum += edc.fnmr[np.clip(steps, 0, edc.fnmr.size - 1)]
        erc_sum = erc.fnmr if erc_sum is None else erc_sum + erc.fnmr
    mean_edc = EDCCurve(grid, edc_sum / draws, np.full(grid.size, np.nan), int(mated.sum()))
    mean_erc = dataclasses.replace(erc, fnmr=erc_sum / draws, auc=float(np.mean(aucs)), warnings=())
    return MethodResult(
        dataset, RANDOM_METHOD, threshold, mean_edc, float(np.mean(paucs)), discard_limit, mean_erc
    )


def _rows(indices: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f" … ({indices.size} in all)" if indices.size > limit else ""
    return shown + more


def _names(names: np.ndarray | Sequence[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    more = f" … ({len(names)} in all)" if len(names) > limit else ""
    return shown + more
