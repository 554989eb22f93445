"""Which images `igfiqa curate filter` keeps: `Rule` (parsed from `lowest:0.2`, ...) and `select`,
which applies one to per-image quality and labels (data_prep.curate writes what it keeps).

Rules, on the scores of `quality.parquet` (data_prep.quality_file):

    lowest:F               drop the ⌊F·N⌋ lowest-quality images of the whole dataset
    lowest-per-identity:F  drop the ⌊F·n⌋ lowest of every identity of n images
    below:T                drop every image whose quality is below T
    (F may be written as a percentage: lowest:20%)

and on the calibrated columns of a quality file scored with a calibration
(data_prep.calibration_map; `Rule.column` names the column a rule reads):

    expected-fnmr-above:P  drop every image whose expected FNMR is above P (0.05 or 5%)
    score-below:S          drop every image whose 0–100 quality_score is below S

Ties are broken by manifest row (the earlier row goes first), so a rule always removes the
same images. Then every identity must keep at least `min_per_identity` (k) images: one left
with fewer is removed whole (`below_min="drop"`), or gets back its best removed images up to
k (`"restore"`; an identity with fewer than k images in all is removed either way). Kept
identities are renumbered 0..C'−1 in the order of their old labels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_prep.errors import DataError

RULE_KINDS = ("lowest", "lowest-per-identity", "below", "expected-fnmr-above", "score-below")
RULE_COLUMNS = {"expected-fnmr-above": "expected_fnmr", "score-below": "quality_score"}  # others: quality
BELOW_MIN_ACTIONS = ("drop", "restore")
_COUNT_SLACK = 1e-9  # ⌊F·N⌋ computed as floor(F·N + slack): 0.29·100 is 28.999… in binary
KEPT, REMOVED_BY_RULE, REMOVED_WITH_IDENTITY = 0, 1, 2


@dataclass(frozen=True)
class Rule:
    """Which images a curation keeps (see the module docstring)."""

    kind: str
    value: float
    min_per_identity: int = 1
    below_min: str = "drop"

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise DataError(f"rule {self.kind!r} is not one of {', '.join(RULE_KINDS)}")
        if not math.isfinite(self.value):
            raise DataError(f"rule {self.kind}: the value must be a finite number, got {self.value}")
        if (
            self.kind in ("lowest", "lowest-per-identity", "expected-fnmr-above")
            and not 0.0 <= self.value <= 1.0
        ):
            what = "an FNMR" if self.kind == "expected-fnmr-above" else "the fraction"
            raise DataError(f"rule {self.kind}: {what} must be in [0, 1] (or 0%-100%), got {self.value}")
        if self.kind == "score-below" and not 0.0 <= self.value <= 100.0:
            raise DataError(f"rule {self.kind}: the score must be in [0, 100], got {self.value}")
        if self.min_per_identity < 1:
            raise DataError(f"min_per_identity must be >= 1, got {self.min_per_identity}")
        if self.below_min not in BELOW_MIN_ACTIONS:
            raise DataError(f"below_min must be one of {BELOW_MIN_ACTIONS}, got {self.below_min!r}")

    @property
    def column(self) -> str:
        """The quality file's column the rule reads: quality, expected_fnmr or quality_score."""
        return RULE_COLUMNS.get(self.kind, "quality")

    @property
    def lower_is_better(self) -> bool:
        """Whether a lower value of `column` is a better image (expected FNMR)."""
        return self.kind == "expected-fnmr-above"

    def text(self) -> str:
        """The rule as written on the command line, e.g. `score-below:40`."""
        return f"{self.kind}:{self.value:g}"

    @classmethod
    def parse(cls, text: str, *, min_per_identity: int = 1, below_min: str = "drop") -> Rule:
        """`lowest:0.2`, `lowest:20%`, `lowest-per-identity:0.1`, `below:-0.35`."""
        match = re.fullmatch(r"\s*([a-z-]+)\s*[:=]\s*([-+0-9.eE]+)\s*(%?)\s*", text)
        if match is None:
            raise DataError(
                f"rule {text!r}: write KIND:VALUE, e.g. lowest:0.2, lowest:20%, lowest-per-identity:0.1, "
                "below:0.35, expected-fnmr-above:0.05, score-below:40"
            )
        kind, number, percent = match.groups()
        try:
            value = float(number)
        except ValueError:
            raise DataError(f"rule {text!r}: {number!r} is not a number") from None
        if percent:
            if kind in ("below", "score-below"):
                raise DataError(f"rule {text!r}: a threshold is a quality value, not a percentage")
            value /= 100.0
        return cls(kind, value, min_per_identity=min_per_identity, below_min=below_min)

    def describe(self) -> str:
        """One line a person reads, e.g. "drop the lowest 20% of all images; an identity left with
        fewer than 2: remove it"."""
        if self.kind == "lowest":
            what = f"drop the lowest {self.value * 100:.4g}% of all images"
        elif self.kind == "lowest-per-identity":
            what = f"drop the lowest {self.value * 100:.4g}% of every identity's images"
        elif self.kind == "expected-fnmr-above":
            what = f"drop images with an expected FNMR above {self.value:.6g}"
        elif self.kind == "score-below":
            what = f"drop images with a quality_score below {self.value:.6g}"
        else:
            what = f"drop images with quality below {self.value:.6g}"
        if self.min_per_identity == 1:
            return f"{what} (an identity left with none is gone)"
        then = "remove it" if self.below_min == "drop" else "give back its best images"
        return f"{what}; an identity left with fewer than {self.min_per_identity}: {then}"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "min_per_identity": self.min_per_identity,
            "below_min": self.below_min,
        }


@dataclass(frozen=True)
class Selection:
    """What a rule keeps of a dataset, per manifest row, and the renumbering of the kept identities."""

    keep: np.ndarray  # bool [N]
    reason: np.ndarray  # int8 [N]: KEPT, REMOVED_BY_RULE or REMOVED_WITH_IDENTITY
    restored: np.ndarray  # bool [N]: removed by the rule, given back so its identity keeps k
    source_labels: np.ndarray  # int64 [C']: the old label of each new label
    source_counts: np.ndarray  # int64 [C]: images per old label in the source

    @property
    def num_kept(self) -> int:
        return int(self.keep.sum())

    def new_labels(self, labels: np.ndarray) -> np.ndarray:
        """The curated label of each kept row's old label (rows that are not kept: -1)."""
        mapped = np.searchsorted(self.source_labels, labels)  # exact for kept rows: their label is listed
        return np.where(self.keep, mapped, -1).astype(np.int64)

    def counts(self) -> dict[str, int]:
        """Images and identities kept and removed, and why."""
        source_classes = int((self.source_counts > 0).sum())
        return {
            "images": int(self.keep.sum()),
            "removed_images": int((~self.keep).sum()),
            "removed_by_rule": int((self.reason == REMOVED_BY_RULE).sum()),
            "removed_with_identity": int((self.reason == REMOVED_WITH_IDENTITY).sum()),
            "restored": int(self.restored.sum()),
            "classes": len(self.source_labels),
            "removed_classes": source_classes - len(self.source_labels),
        }


def _fraction_count(fraction: float, n: np.ndarray | int) -> np.ndarray:
    return np.floor(np.asarray(n, dtype=np.float64) * fraction + _COUNT_SLACK).astype(np.int64)


def _rank_within(labels: np.ndarray, order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each row's rank inside its label when rows are taken in `order` (sorted by label first)."""
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def select(quality: np.ndarray, labels: np.ndarray, rule: Rule, *, num_classes: int) -> Selection:
    """Apply `rule` to per-row values of its column (`rule.column`: quality, expected_fnmr or
    quality_score) and `labels`; DataError when nothing would be kept."""
    values = np.asarray(quality, dtype=np.float64)
    quality = -values if rule.lower_is_better else values  # higher = better from here on
    labels = np.asarray(labels, dtype=np.int64)
    n = len(quality)
    rows = np.arange(n)
    sizes = np.bincount(labels, minlength=num_classes)
    if rule.kind == "lowest":
        dropped = np.zeros(n, dtype=bool)
        dropped[np.lexsort((rows, quality))[: int(_fraction_count(rule.value, n))]] = True
    elif rule.kind == "lowest-per-identity":
        rank = _rank_within(labels, np.lexsort((rows, quality, labels)), sizes)
        dropped = rank < _fraction_count(rule.value, sizes)[labels]
    elif rule.kind == "expected-fnmr-above":
        dropped = values > rule.value
    else:  # below, score-below
        dropped = values < rule.value
    keep = ~dropped
    reason = np.where(dropped, REMOVED_BY_RULE, KEPT).astype(np.int8)
    restored = np.zeros(n, dtype=bool)
    k = rule.min_per_identity
    short = (np.bincount(labels[keep], minlength=num_classes) < k) & (sizes > 0)
    if rule.below_min == "restore":
        refill = short & (sizes >= k)
        # best first; among equal scores the later row, as the rules keep it (they drop earlier rows first)
        best_rank = _rank_within(labels, np.lexsort((-rows, -quality, labels)), sizes)
        restored = refill[labels] & (best_rank < k) & ~keep
        keep |= restored
        reason[restored] = KEPT
        short &= ~refill
    removed_with_identity = short[labels] & keep
    keep &= ~short[labels]
    reason[removed_with_identity] = REMOVED_WITH_IDENTITY
    if not keep.any():
        raise DataError(
            f"the rule ({rule.describe()}) keeps none of the {n} images "
            f"({rule.column} from {values.min(initial=np.inf):.4g} to {values.max(initial=-np.inf):.4g}): "
            "nothing was written; choose a milder rule"
        )
    kept_sizes = np.bincount(labels[keep], minlength=num_classes)
    return Selection(
        keep=keep,
        reason=reason,
        restored=restored,
        source_labels=np.flatnonzero(kept_sizes > 0).astype(np.int64),
        source_counts=sizes.astype(np.int64),
    )
