"""`calibration.json`: a model's raw quality mapped to the expected FNMR of an image, and the 0–100 score.

Written by `igfiqa calibrate` (pipeline.evaluation.calibration), read by `igfiqa score
--calibration`, `igfiqa curate score --calibration` and `igfiqa export --calibration` (which
stores the map in the ONNX model's metadata). This module is the format and its two formulas;
it needs numpy only, so every stage (and anyone holding an exported model) applies the map the
same way.

The map: knots (q_k ascending, f_k non-increasing) from an isotonic regression; a raw quality q
gives

    expected_fnmr(q) = f interpolated linearly between the knots, f_0 below q_0, f_K above q_K

(numpy.interp), the FNMR an image of quality q is expected to have in its mated comparisons at
the calibration's FMR and matcher (the fraction of its mated comparisons at or below the
threshold). The 0–100 score, higher = better as in ISO/IEC 29794-1 and OFIQ:

    quality_score = clip(round(−25 · log10(max(expected_fnmr, 1e-4))), 0, 100)

25 points per factor of ten in FNMR: 100 ⇔ FNMR ≤ 1e-4, 75 ⇔ 1e-3, 50 ⇔ 1 %, 25 ⇔ 10 %, 0 ⇔ 100 %.
A log scale because FNMR spans orders of magnitude: a linear 100·(1 − FNMR) puts every usable
image between 95 and 100, the bunching FIQA scores are blamed for. `expected_fnmr_of_score`
inverts it (the FNMR a score threshold stands for).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import DataError

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = "igfiqa.calibration"
CALIBRATION_VERSION = 1
ONNX_METADATA_KEY = "igfiqa.calibration"  # metadata_props key of an exported model's map
SCORE_POINTS_PER_DECADE = 25.0
SCORE_FNMR_FLOOR = 1e-4  # expected FNMR at or below it scores 100
SCORE_DEFINITION = (
    "quality_score = clip(round(-25 * log10(max(expected_fnmr, 1e-4))), 0, 100): 25 points per factor "
    "of ten in FNMR (100: FNMR <= 1e-4, 75: 1e-3, 50: 1%, 25: 10%, 0: 100%)"
)


def quality_score(expected_fnmr: np.ndarray) -> np.ndarray:
    """The 0–100 integer score (int16) of expected FNMRs (see the module docstring); NaN gives -1."""
    fnmr = np.asarray(expected_fnmr, dtype=np.float64)
    finite = np.isfinite(fnmr)
    safe = np.maximum(np.where(finite, fnmr, 1.0), SCORE_FNMR_FLOOR)
    score = np.clip(np.rint(-SCORE_POINTS_PER_DECADE * np.log10(safe)), 0, 100)
    return np.where(finite, score, -1).astype(np.int16)


def expected_fnmr_of_score(score: float) -> float:
    """The expected FNMR a score stands for (the inverse of `quality_score` before rounding)."""
    return float(10.0 ** (-float(score) / SCORE_POINTS_PER_DECADE))


@dataclass(frozen=True)
class CalibrationMap:
    """The part of a calibration that travels with the model: the knots and what they were fitted for."""

    quality: tuple[float, ...]  # knots, ascending
    expected_fnmr: tuple[float, ...]  # at the knots, non-increasing, in [0, 1]
    fmr: float
    threshold: float
    matcher: str  # the matcher's name (file stem)
    matcher_sha256: str
    model_fingerprint: str  # pipeline.method.model.model_fingerprint of the calibrated model
    calibration_sha256: str = ""  # of the calibration.json it was read from ("" when built in memory)

    def __post_init__(self) -> None:
        q = np.asarray(self.quality, dtype=np.float64)
        f = np.asarray(self.expected_fnmr, dtype=np.float64)
        problem = None
        if q.ndim != 1 or q.shape != f.shape or q.size == 0:
            problem = f"{q.size} quality knots and {f.size} FNMR knots: need the same number, at least one"
        elif not (np.isfinite(q).all() and np.isfinite(f).all()):
            problem = "knots must be finite numbers"
        elif np.any(np.diff(q) <= 0):
            problem = "quality knots must be strictly ascending"
        elif np.any(np.diff(f) > 0):
            problem = "expected FNMR must not increase with quality (a monotone non-increasing map)"
        elif f.min() < 0 or f.max() > 1:
            problem = "expected FNMR must lie in [0, 1]"
        elif not (0 < self.fmr < 1):
            problem = f"FMR {self.fmr} must lie strictly between 0 and 1"
        if problem is not None:
            raise DataError(f"calibration map: {problem}")

    def expected(self, quality: np.ndarray) -> np.ndarray:
        """Expected FNMR (float64) of raw qualities; NaN stays NaN."""
        q = np.asarray(quality, dtype=np.float64)
        return np.where(np.isfinite(q), np.interp(q, self.quality, self.expected_fnmr), np.nan)

    def score(self, quality: np.ndarray) -> np.ndarray:
        """The 0–100 `quality_score` (int16; −1 for a NaN quality) of raw qualities."""
        return quality_score(self.expected(quality))

    def to_json_dict(self) -> dict[str, Any]:
        """The map as stored in calibration.json ("map") and in an ONNX model's metadata."""
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "quality": list(self.quality),
            "expected_fnmr": list(self.expected_fnmr),
            "interpolation": "linear between knots, constant beyond the ends (numpy.interp)",
            "fmr": self.fmr,
            "threshold": self.threshold,
            "matcher": self.matcher,
            "matcher_sha256": self.matcher_sha256,
            "model_fingerprint": self.model_fingerprint,
            "quality_score": SCORE_DEFINITION,
        }

    @classmethod
    def from_json_dict(cls, obj: Any, *, where: object = None, sha256: str = "") -> CalibrationMap:
        """The map of `to_json_dict`'s layout; DataError naming `where` and the key when it is not one."""
        if not isinstance(obj, dict) or obj.get("format") != CALIBRATION_FORMAT:
            raise DataError(
                f'not an {CALIBRATION_FORMAT} map (no "format": "{CALIBRATION_FORMAT}")', path=where
            )
        if obj.get("version") != CALIBRATION_VERSION:
            raise DataError(
                f"calibration version {obj.get('version')!r}; this code reads version {CALIBRATION_VERSION}",
                path=where,
            )
        try:
            return cls(
                quality=tuple(float(v) for v in obj["quality"]),
                expected_fnmr=tuple(float(v) for v in obj["expected_fnmr"]),
                fmr=float(obj["fmr"]),
                threshold=float(obj["threshold"]),
                matcher=str(obj["matcher"]),
                matcher_sha256=str(obj["matcher_sha256"]),
                model_fingerprint=str(obj["model_fingerprint"]),
                calibration_sha256=sha256,
            )
        except KeyError as exc:
            raise DataError(f"the calibration map has no {exc.args[0]!r}", path=where) from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"malformed calibration map: {exc}", path=where) from None
        except DataError as exc:
            raise DataError(exc.reason, path=where) from None

    def describe(self) -> str:
        """One line: what the expected FNMR means for this map."""
        return (
            f"expected FNMR of an image's mated comparisons by {self.matcher} at FMR {self.fmr:g} "
            f"(threshold {self.threshold:.6g})"
        )


def read_calibration(path: Path) -> CalibrationMap:
    """The map of a calibration.json that `igfiqa calibrate` wrote; DataError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such calibration file (write one with `igfiqa calibrate`)", path=path)
    raw = path.read_bytes()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"not JSON: {exc}", path=path) from None
    if not isinstance(document, dict) or "map" not in document:
        raise DataError('no "map": not a calibration.json written by `igfiqa calibrate`', path=path)
    return CalibrationMap.from_json_dict(document["map"], where=path, sha256=hashlib.sha256(raw).hexdigest())
