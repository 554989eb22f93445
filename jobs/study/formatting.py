"""How the study's tables and plots show spread over seeds ('mean ± h (n)', 95 % t bands) and pipe tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.evaluation.paired import t_interval


def spread(values: Sequence[float]) -> str:
    """'mean ± h (n)', h the half-width of the 95 % t-interval over seeds."""
    mean, half = t_interval(np.asarray(values, dtype=float))
    n = int(np.isfinite(np.asarray(values, dtype=float)).sum())
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.4f} ± {half:.4f} ({n})" if math.isfinite(half) else f"{mean:.4f} ({n})"


def mean_spread(frame: pd.DataFrame, columns: Sequence[str], by: str = "arm") -> pd.DataFrame:
    """'mean ± h (n)' per group (`by`) and column."""
    grouped = frame.groupby(by, sort=False)
    table = pd.DataFrame(index=list(grouped.groups))
    for column in columns:
        table[column] = [spread(values) for _, values in grouped[column]]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """A pipe table (hand-written: pandas' to_markdown needs the tabulate package)."""
    header = ["", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def mean_band(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95 % t half-width over rows (seeds) at each column (zero half-width with one row)."""
    from scipy.stats import t as student_t

    mean = rows.mean(axis=0)
    if len(rows) < 2:
        return mean, np.zeros_like(mean)
    half = student_t.ppf(0.975, len(rows) - 1) * rows.std(axis=0, ddof=1) / math.sqrt(len(rows))
    return mean, half
