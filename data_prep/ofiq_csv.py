"""Scores in OFIQ's CSV layout, so tools that read OFIQ's output (BSI-OFIQ/OFIQ-Project) read ours.

OFIQ's layout (its data/tests/expected_results/expected_results.csv): fields separated by `;`,
a header row, `Filename` first, then one column of raw values per measure, then the same
measures again with the suffix `.scalar`, holding the 0–100 integer scalar (higher = better).
OFIQ ends the header row, and only it, with a `;`; we do the same. Raw values are written
with six decimals as OFIQ does; an image that could not be scored has both fields empty.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_write_bytes

SEPARATOR = ";"
SCALAR_SUFFIX = ".scalar"


def ofiq_csv_text(filenames: Sequence[str], measures: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """The CSV text: `measures` maps a measure name to (raw values, scalar 0–100 values), one per file;
    a NaN raw value or a negative scalar is written as an empty field."""
    names = list(measures)
    bad = [name for name in names if SEPARATOR in name or "\n" in name or not name]
    if bad or any(SEPARATOR in f or "\n" in f for f in filenames):
        raise ValueError(f"measure names and file names must not hold {SEPARATOR!r} or a line break: {bad}")
    out = io.StringIO()
    out.write(SEPARATOR.join(["Filename", *names, *(n + SCALAR_SUFFIX for n in names)]) + SEPARATOR + "\n")
    raws = [np.asarray(measures[n][0], dtype=np.float64) for n in names]
    scalars = [np.asarray(measures[n][1]) for n in names]
    for row, filename in enumerate(filenames):
        fields = [filename]
        fields += ["" if not np.isfinite(raw[row]) else f"{raw[row]:.6f}" for raw in raws]
        fields += ["" if scalar[row] < 0 else str(int(scalar[row])) for scalar in scalars]
        out.write(SEPARATOR.join(fields) + "\n")
    return out.getvalue()


def write_ofiq_csv(
    path: Path, filenames: Sequence[str], measures: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Write `ofiq_csv_text` to `path` atomically (UTF-8)."""
    atomic_write_bytes(Path(path), ofiq_csv_text(filenames, measures).encode())
