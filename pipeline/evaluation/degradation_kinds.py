"""What a matcher fails on, by degradation kind, beside where a quality model ranks each kind.

A quality model is useful to a matcher when it ranks lowest the images that matcher fails on. On a
set whose ground truth names each image's degradation kind (`prep synth --identity-set`: none,
blur, lowres, noise, occlusion, dark, compression), two figures per kind explain an EDC:

- `image_failure_rates`: per image, the fraction of its mated comparisons that the matcher rejects
  at the threshold of a target FMR (the threshold set on the non-mated comparisons, as the EDC's;
  a rejection is similarity ≤ threshold, as in `quality_metrics`); `kind_failure_table` averages
  them per kind: how hard each kind is for each matcher;
- `kind_percentiles`: per kind, the mean rank percentile of its images' quality within the set
  (0 lowest, 1 highest; ties averaged): where the model puts that kind.

A model whose percentiles fall as the kinds' failure rates rise ranks for that matcher; one that
puts a kind the matcher tolerates below one it fails on wastes the discards of the EDC on it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from pipeline.evaluation.comparisons import Comparisons
from pipeline.evaluation.quality_metrics import threshold_at_fmr


def image_failure_rates(comparisons: Comparisons, fmr: float) -> tuple[np.ndarray, float]:
    """(per image: rejected mated comparisons / its mated comparisons, NaN for an image with none;
    the threshold at `fmr` on the non-mated comparisons)."""
    mated = np.asarray(comparisons.mated, dtype=bool)
    threshold = threshold_at_fmr(comparisons.similarity[~mated], fmr).value
    rejected = (comparisons.similarity[mated] <= threshold).astype(np.float64)
    n = comparisons.num_images
    left, right = comparisons.left[mated], comparisons.right[mated]
    counts = np.bincount(left, minlength=n) + np.bincount(right, minlength=n)
    failures = np.bincount(left, weights=rejected, minlength=n) + np.bincount(
        right, weights=rejected, minlength=n
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counts > 0, failures / np.maximum(counts, 1), np.nan)
    return rates, threshold


def kind_failure_table(kinds: np.ndarray, failure_rates: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per kind (rows, in first-seen order): images, and per matcher the mean of their failure rates."""
    frame = pd.DataFrame({"kind": np.asarray(kinds, dtype=str), **failure_rates})
    grouped = frame.groupby("kind", sort=False)
    return pd.concat([grouped.size().rename("images"), grouped[list(failure_rates)].mean()], axis=1)


def kind_percentiles(quality: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Per kind: the mean rank percentile of its images' quality among all images (ties averaged;
    the lowest image ~0, the highest 1)."""
    quality = np.asarray(quality, dtype=np.float64)
    if quality.shape != np.shape(kinds):
        raise ValueError(f"quality {quality.shape} and kinds {np.shape(kinds)} must name the same images")
    percentile = rankdata(quality) / quality.size
    frame = pd.DataFrame({"kind": np.asarray(kinds, dtype=str), "percentile": percentile})
    return frame.groupby("kind", sort=False)["percentile"].mean().to_dict()
