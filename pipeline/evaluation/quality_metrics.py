"""Quality evaluation of a FIQA method: EDC (ISO/IEC 29794-1) and the FIQA papers' ERC AUC.

Inputs are comparisons (`similarity`, higher = more alike; `mated` or not) and a quality score
per image; a pair's quality is the minimum of its two images' qualities. The core works on
arrays (`pipeline.evaluation.comparisons.Comparisons`: left/right image indices, similarity,
mated, in the pairs' canonical order; per-image quality) and serves both a pairs table (`evaluate_quality`, the thin wrapper
`igfiqa erc` uses) and the all-vs-all comparisons of an identity-labelled set
(`pipeline.evaluation.all_pairs`). A comparison matches when its similarity is strictly greater
than τ, fixed once on all non-mated pairs at the target FMR (when FMR·N_non-mated < 1 no
threshold reaches it: τ is the highest non-mated similarity and the result carries a warning).
`edc_curve` discards mated pairs lowest quality first, ties together, and integrates stepwise to
a discard limit; `paper_erc` rejects the lowest ⌊r·N⌋ of all pairs (ties in the canonical pair
order) for r = 0…0.95 and integrates by trapezoids (`refit_threshold=True` reproduces the
published CR-FIQA script). Exact definitions and how CR-FIQA's script differs: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.comparisons import (
    Comparisons,
    PairOrder,
    QualityEvalError,
    checked_quality,
    comparisons_from_pairs,
    image_qualities,
    quality_columns,
    validate_pairs,
)

DEFAULT_FMRS = (1e-3, 1e-4)  # the paper's; kept where a set resolves them (`resolvable_fmrs`)
MIN_FALSE_MATCHES = 10  # an FMR is measured when at least this many non-mated pairs lie above τ
DEFAULT_DISCARD_LIMIT = 0.2
RANDOM_METHOD = "random"  # the random-quality reference every evaluation carries
RANDOM_SEED = 20_240_229  # its image qualities: the same draws every run
DEFAULT_RANDOM_DRAWS = 20
RANDOM_EDC_POINTS = 201  # the random reference's mean EDC: FNMR at evenly spaced discard fractions
CURVE_POINTS = 1000  # an EDC curve's points in the report (`EDCCurve.downsampled`)
PAPER_REJECT_STEP = 0.05
PAPER_REJECT_POINTS = 20  # r = 0, 0.05, …, 0.95
# FMR·N is floored with this relative slack so that 0.29·100 (= 28.999999999999996) gives 29.
_FLOOR_SLACK = 1e-12


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
    scores = np.asarray(nonmated_similarity)
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    n = scores.size
    if n == 0:
        raise QualityEvalError("no non-mated pairs: an FMR threshold cannot be set")
    allowed = math.floor(fmr * n * (1.0 + _FLOOR_SLACK))  # allowed < n because fmr < 1
    value = float(np.partition(scores, n - 1 - allowed)[n - 1 - allowed])  # the (allowed+1)-th highest
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

    def downsampled(self, max_points: int = CURVE_POINTS) -> EDCCurve:
        """At most `max_points` of this curve's points, each exact: the last point at or before each of
        `max_points - 1` evenly spaced discard fractions, and the closing point. (A curve has one
        point per distinct quality level: up to one per mated pair.) Figures computed from the
        curve (pAUC) belong to the full one."""
        n = len(self.discard_fraction)
        if n <= max_points:
            return self
        grid = np.linspace(0.0, 1.0, max_points - 1)
        picked = np.searchsorted(self.discard_fraction, grid, side="right") - 1
        picked = np.unique(np.append(np.clip(picked, 0, n - 1), n - 1))
        return EDCCurve(
            self.discard_fraction[picked], self.fnmr[picked], self.quality_cutoff[picked], self.num_mated
        )


def edc_curve(
    similarity: np.ndarray, mated: np.ndarray, pair_quality: np.ndarray, threshold: float
) -> EDCCurve:
    """The FNM-EDC of the mated pairs at a fixed threshold; equal qualities are discarded together."""
    similarity, mated, pair_quality = _as_arrays(similarity, mated, pair_quality)
    return _edc(similarity[mated], pair_quality[mated], threshold)


def _edc(mated_similarity: np.ndarray, mated_quality: np.ndarray, threshold: float) -> EDCCurve:
    return _MatedLevels(mated_similarity, mated_quality).edc(threshold)


class _MatedLevels:
    """The mated pairs sorted by quality once (stable), with where each quality level starts: the
    EDC at any threshold is then one cumulative sum (no sort per FMR)."""

    def __init__(self, mated_similarity: np.ndarray, mated_quality: np.ndarray) -> None:
        order = np.argsort(mated_quality, kind="stable")
        quality = mated_quality[order]
        if quality.size == 0:
            raise QualityEvalError("no mated pairs: FNMR is undefined")
        self.similarity = mated_similarity[order]
        self.level_starts = np.concatenate([[0], np.flatnonzero(quality[1:] != quality[:-1]) + 1])
        self.cutoff = np.append(quality[self.level_starts], np.nan)

    def edc(self, threshold: float) -> EDCCurve:
        """The FNM-EDC at `threshold` (see `edc_curve`)."""
        n = self.similarity.size
        errors = (self.similarity <= threshold).astype(np.int64)
        # errors_from[i] = errors among the pairs i.. (what remains after discarding the first i)
        errors_from = np.concatenate([np.cumsum(errors[::-1])[::-1], [0]])
        remaining = n - self.level_starts
        discard_fraction = np.append(self.level_starts / n, 1.0)
        fnmr = np.append(errors_from[self.level_starts] / remaining, 0.0)
        return EDCCurve(discard_fraction, fnmr, self.cutoff, n)


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
    if refit_threshold:
        return _script_erc(similarity, mated, pair_quality, fmr)
    tau = threshold_at_fmr(similarity[~mated], fmr).value
    return _fixed_erc(PairOrder.of_pair_quality(pair_quality, mated), similarity, tau)


def _fixed_erc(order: PairOrder, similarity: np.ndarray, tau: float) -> PaperERC:
    """The paper variant: reject the first ⌊r·N⌋ pairs of `order`, FNMR of the mated pairs left at τ."""
    n = len(similarity)
    steps = np.arange(PAPER_REJECT_POINTS)
    rates = steps * PAPER_REJECT_STEP
    counts = (steps * n) // PAPER_REJECT_POINTS  # exact ⌊r·N⌋ in integers
    errors = similarity[order.mated_index] <= tau
    order.prefetch(counts)
    fnmrs, warnings = [], []
    for rate, count in zip(rates, counts, strict=True):
        kept = order.kept_mated(int(count))
        remaining = int(np.count_nonzero(kept))
        if remaining == 0:
            warnings.append(f"reject {rate:.2f}: no mated pair left; FNMR taken as 0")
            fnmrs.append(0.0)
        else:
            fnmrs.append(float(np.count_nonzero(errors & kept)) / remaining)
    fnmr = np.asarray(fnmrs, dtype=np.float64)
    # scipy/numpy trapezoid, the same rule as sklearn.metrics.auc in the script
    auc = float(np.trapezoid(fnmr, rates))
    return PaperERC(rates.astype(np.float64), fnmr, np.full(rates.size, tau), auc, False, tuple(warnings))


def _script_erc(similarity: np.ndarray, mated: np.ndarray, pair_quality: np.ndarray, fmr: float) -> PaperERC:
    """The published CR-FIQA script: its grid, rejected counts and threshold refit at every step."""
    n = similarity.size
    rates = np.arange(0, 0.98, PAPER_REJECT_STEP)
    counts = np.array([int(r * n) for r in rates])  # float arithmetic included
    order = np.argsort(pair_quality)
    fnmrs, thresholds, warnings = [], [], []
    for rate, count in zip(rates, counts, strict=True):
        kept = order[count:]
        sim_kept, mated_kept = similarity[kept], mated[kept]
        genuine, impostor = sim_kept[mated_kept], sim_kept[~mated_kept]
        if impostor.size == 0:
            warnings.append(f"reject {rate:.2f}: no non-mated pair left to refit the threshold; FNMR is NaN")
            thresholds.append(np.nan)
            fnmrs.append(np.nan)
            continue
        tau = _script_threshold(sim_kept, impostor, fmr)
        thresholds.append(tau)
        if genuine.size == 0:
            warnings.append(f"reject {rate:.2f}: no mated pair left; FNMR taken as 0")
            fnmrs.append(0.0)
        else:
            fnmrs.append(float(np.count_nonzero(genuine <= tau)) / genuine.size)
    fnmr = np.asarray(fnmrs, dtype=np.float64)
    auc = float(np.trapezoid(fnmr, rates))
    return PaperERC(
        np.asarray(rates, dtype=np.float64), fnmr, np.asarray(thresholds), auc, True, tuple(warnings)
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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MethodResult:
    """One FIQA method at one FMR on one dataset (compared by one matcher)."""

    dataset: str
    method: str
    threshold: Threshold
    edc: EDCCurve
    edc_pauc: float
    discard_limit: float
    erc: PaperERC
    erc_refit: PaperERC | None = None
    reference: MethodResult | None = None  # the random-quality reference on the same pairs and FMR
    matcher: str = ""  # the FR model behind the comparisons ("" when a pairs table came without one)

    def summary(self) -> dict[str, object]:
        """The scalar results, one flat row (for JSON, CSV and MLflow)."""
        row: dict[str, object] = {"dataset": self.dataset}
        if self.matcher:
            row["matcher"] = self.matcher
        row |= {
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
    """Every method × FMR on one dataset and matcher, with the warnings the report must show."""

    dataset: str
    num_pairs: int
    num_mated: int
    num_nonmated: int
    results: list[MethodResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    matcher: str = ""
    pair_set: dict[str, Any] = field(default_factory=dict)  # how the pairs were chosen (all_pairs)
    random_draws: int = 0  # draws averaged into the random-quality reference (0: none)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.results))

    @property
    def fmrs(self) -> list[float]:
        return list(dict.fromkeys(r.threshold.fmr_target for r in self.results))

    @property
    def label(self) -> str:
        """ "<dataset>", or "<dataset> (<matcher>)" when a matcher is named."""
        return f"{self.dataset} ({self.matcher})" if self.matcher else self.dataset


def evaluate_comparisons(
    comparisons: Comparisons,
    qualities: Mapping[str, np.ndarray],
    *,
    dataset: str,
    matcher: str = "",
    fmrs: Sequence[float] | None = None,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    crfiqa_refit: bool = False,
    nan_policy: str = "error",
    random_draws: int = DEFAULT_RANDOM_DRAWS,
    image_names: Sequence[str] | np.ndarray | None = None,
    scores_source: str = "scores",
    pair_set: Mapping[str, Any] | None = None,
) -> QualityEvaluation:
    """EDC (+ pAUC) and the papers' ERC AUC of every method's per-image quality × FMR on `comparisons`.

    `qualities`: method → quality of each of the `comparisons.num_images` images. `fmrs=None`
    takes the paper's FMRs where the set resolves them, else the one it resolves
    (`resolvable_fmrs`). Beside the methods, a random-quality reference (method "random": i.i.d.
    uniform image qualities, the mean of `random_draws` draws; 0 leaves it out) is measured on the
    same pairs, and every method's summary carries its ratio to it. `image_names` name images in
    messages.
    """
    if not (0.0 < discard_limit <= 1.0):
        raise QualityEvalError(f"discard limit {discard_limit!r} must lie in (0, 1]")
    if fmrs is not None and not fmrs:
        raise QualityEvalError("give at least one FMR target")
    for fmr in fmrs or ():
        _check_fmr(fmr)
    if nan_policy not in ("error", "lowest"):
        raise QualityEvalError(f"nan_policy {nan_policy!r} must be 'error' or 'lowest'")
    if comparisons.num_mated == 0 or comparisons.num_nonmated == 0:
        kind = "non-mated" if comparisons.num_mated == 0 else "mated"
        raise QualityEvalError(
            f"{dataset}: all {comparisons.num_pairs} pairs are {kind}; the evaluation needs both mated "
            "pairs (for FNMR) and non-mated pairs (for the FMR threshold)"
        )
    evaluation = QualityEvaluation(
        dataset,
        comparisons.num_pairs,
        comparisons.num_mated,
        comparisons.num_nonmated,
        matcher=matcher,
        pair_set=dict(pair_set or {}),
        random_draws=max(random_draws, 0),
    )
    fmrs = list(fmrs) if fmrs else resolvable_fmrs(evaluation.num_nonmated)
    nonmated_similarity = comparisons.similarity[~comparisons.mated]
    thresholds = {fmr: threshold_at_fmr(nonmated_similarity, fmr) for fmr in fmrs}
    del nonmated_similarity
    for threshold in thresholds.values():
        if (message := threshold.warning()) is not None:
            evaluation.warnings.append(f"{dataset}: {message}")
    references = _random_reference(evaluation, comparisons, thresholds, discard_limit, random_draws)
    for method, values in qualities.items():
        quality, warnings = checked_quality(
            values, method, comparisons.num_images, nan_policy, image_names, scores_source
        )
        evaluation.warnings.extend(f"{dataset}: {w}" for w in warnings)
        order = PairOrder.of_image_quality(comparisons, quality)
        levels = _MatedLevels(*_mated(comparisons, order, quality))
        pair_quality = comparisons.pair_quality(quality) if crfiqa_refit else None
        for fmr, threshold in thresholds.items():
            edc = levels.edc(threshold.value)
            erc = _fixed_erc(order, comparisons.similarity, threshold.value)
            refit = None
            if pair_quality is not None:
                refit = _script_erc(
                    comparisons.similarity.astype(np.float64), comparisons.mated, pair_quality, fmr
                )
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
                    matcher=matcher,
                )
            )
    evaluation.results.extend(references.values())
    return evaluation


def _mated(comparisons: Comparisons, order: PairOrder, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, pair quality) of the mated pairs, in canonical order."""
    left, right = comparisons.left[order.mated_index], comparisons.right[order.mated_index]
    return comparisons.similarity[order.mated_index], np.minimum(quality[left], quality[right])


def _random_reference(
    evaluation: QualityEvaluation,
    comparisons: Comparisons,
    thresholds: Mapping[float, Threshold],
    discard_limit: float,
    draws: int,
) -> dict[float, MethodResult]:
    """Per FMR, the mean EDC and ERC of `draws` i.i.d. uniform image qualities (seeded: the same
    every run, one draw per image of `comparisons` in index order).

    Its EDC is the mean FNMR on a grid of RANDOM_EDC_POINTS discard fractions; pAUC and AUC are the
    means of the draws' own figures. Each draw costs one ranking of the images and one pass over
    the pairs (`PairOrder.of_image_quality`), and one sort of the mated pairs shared by the FMRs.
    """
    if draws <= 0:
        return {}
    rng = np.random.default_rng(RANDOM_SEED)
    grid = np.linspace(0.0, 1.0, RANDOM_EDC_POINTS)
    edc_sum = {fmr: np.zeros(grid.size) for fmr in thresholds}
    erc_sum = {fmr: np.zeros(PAPER_REJECT_POINTS) for fmr in thresholds}
    paucs: dict[float, list[float]] = {fmr: [] for fmr in thresholds}
    aucs: dict[float, list[float]] = {fmr: [] for fmr in thresholds}
    last: dict[float, PaperERC] = {}
    for _ in range(draws):
        image_quality = rng.random(comparisons.num_images)
        order = PairOrder.of_image_quality(comparisons, image_quality)
        levels = _MatedLevels(*_mated(comparisons, order, image_quality))
        for fmr, threshold in thresholds.items():
            edc = levels.edc(threshold.value)
            erc = _fixed_erc(order, comparisons.similarity, threshold.value)
            paucs[fmr].append(edc.pauc(discard_limit))
            aucs[fmr].append(erc.auc)
            steps = np.searchsorted(edc.discard_fraction, grid, side="right") - 1
            edc_sum[fmr] += edc.fnmr[np.clip(steps, 0, edc.fnmr.size - 1)]
            erc_sum[fmr] += erc.fnmr
            last[fmr] = erc
    references = {}
    for fmr, threshold in thresholds.items():
        mean_edc = EDCCurve(grid, edc_sum[fmr] / draws, np.full(grid.size, np.nan), evaluation.num_mated)
        mean_erc = dataclasses.replace(
            last[fmr], fnmr=erc_sum[fmr] / draws, auc=float(np.mean(aucs[fmr])), warnings=()
        )
        references[fmr] = MethodResult(
            evaluation.dataset,
            RANDOM_METHOD,
            threshold,
            mean_edc,
            float(np.mean(paucs[fmr])),
            discard_limit,
            mean_erc,
            matcher=evaluation.matcher,
        )
    return references


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
    matcher: str = "",
) -> QualityEvaluation:
    """`evaluate_comparisons` of a pairs table (left, right, similarity, mated) and a scores table
    (image, one numeric column per method; `methods=None`: all of them)."""
    if not (0.0 < discard_limit <= 1.0):
        raise QualityEvalError(f"discard limit {discard_limit!r} must lie in (0, 1]")
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
    comparisons, names = comparisons_from_pairs(pairs)
    qualities = {m: image_qualities(names, scores, m, source=scores_source) for m in methods}
    return evaluate_comparisons(
        comparisons,
        qualities,
        dataset=dataset,
        matcher=matcher,
        fmrs=fmrs,
        discard_limit=discard_limit,
        crfiqa_refit=crfiqa_refit,
        nan_policy=nan_policy,
        random_draws=random_draws,
        image_names=names,
        scores_source=scores_source,
    )
