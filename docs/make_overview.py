"""Draw docs/img/overview.png, the README's picture of IG-FIQA and of this pipeline.

    .venv/bin/python docs/make_overview.py

Top row: the jobs a user runs. Below: one training step (the paper's Fig. 2 as this code
implements it). Plain matplotlib boxes and arrows, so the picture is regenerated from text.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "img" / "overview.png"

CLEAN, DEGRADED, METHOD, JOB = "#dbe9f6", "#dff3df", "#fbe5c8", "#eeeeee"


def box(ax, x: float, y: float, w: float, h: float, text: str, colour: str, size: int = 9) -> None:
    """A rounded box centred at (x, y)."""
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=colour, edgecolor="#555555", linewidth=1.0,
        )
    )  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(
    ax,
    start: tuple[float, float],
    end: tuple[float, float],
    label: str = "",
    *,
    bend: float = 0.0,
    below: bool = False,
) -> None:
    """An arrow from start to end with an optional label at its middle."""
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=11, linewidth=1.1, color="#333333",
            connectionstyle=f"arc3,rad={bend}", shrinkA=2, shrinkB=2,
        )
    )  # fmt: skip
    if label:
        ax.text(
            (start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + (-0.1 if below else 0.12), label, ha="center",
            va="top" if below else "bottom",
            fontsize=7.5, color="#333333",
        )  # fmt: skip


def draw(path: Path = OUT) -> Path:
    """Render the overview to `path` and return it."""
    fig, ax = plt.subplots(figsize=(13, 6.4))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 6.4)
    ax.axis("off")

    # --- the jobs ---------------------------------------------------------------------------
    jobs_y = 5.75
    steps = [
        (1.2, "train.rec/.idx\n*.bin (InsightFace)"),
        (3.5, "igfiqa prep\nconvert | bins\n(tar shards + manifests)"),
        (6.0, "igfiqa train | submit\n(DDP on SLURM, submitit;\ncheckpoint + requeue)"),
        (8.6, "igfiqa eval | erc\n(EDC / ERC AUC,\nverification accuracy)"),
        (11.3, "igfiqa score | export\n(quality of images,\nONNX)"),
    ]
    for x, text in steps:
        box(ax, x, jobs_y, 2.2, 0.9, text, JOB, size=8.5)
    for (x0, _), (x1, _) in itertools.pairwise(steps):
        arrow(ax, (x0 + 1.1, jobs_y), (x1 - 1.1, jobs_y))
    ax.text(6.5, 5.05, "every stage logs an MLflow run (lineage: dataset fingerprint → training run → evaluation)",
            ha="center", fontsize=8.5, style="italic")  # fmt: skip
    ax.plot([0.2, 12.8], [4.8, 4.8], color="#999999", linewidth=0.8)
    ax.text(0.25, 4.55, "one training step (paper Fig. 2)", fontsize=9, weight="bold")

    # --- one training step ------------------------------------------------------------------
    fr_y, reg_y = 3.6, 1.5
    box(ax, 1.2, fr_y, 2.0, 0.8, "FR half (clean)\nflip only", CLEAN)
    box(
        ax,
        1.2,
        reg_y,
        2.0,
        1.0,
        "regression half\nflip + rescale-blur,\nerase, colour (p=0.3 each)",
        DEGRADED,
        8,
    )
    box(ax, 3.9, 2.55, 2.0, 1.1, "backbone f (iResNet)\none forward of\nboth halves", METHOD)
    arrow(ax, (2.2, fr_y), (2.9, 2.8))
    arrow(ax, (2.2, reg_y), (2.9, 2.3))
    box(ax, 6.6, fr_y, 2.3, 0.8, "sharded ArcFace\n(s=64, m=0.5) → L_Arc", CLEAN)
    box(ax, 6.6, 2.35, 2.3, 0.75, "CCS, NNCCS\nCR = CCS / (NNCCS + 1 + ε)", DEGRADED, 8.5)
    box(ax, 6.6, 1.05, 2.3, 0.75, "quality head R\nq = R(f(x))", DEGRADED)
    arrow(ax, (4.9, 2.9), (5.45, fr_y), "f(x) FR")
    arrow(ax, (4.9, 2.5), (5.45, 2.35))
    arrow(ax, (4.9, 2.15), (5.45, 1.1), "f(x) reg")
    box(
        ax,
        9.5,
        fr_y,
        2.5,
        0.95,
        "variance table v (per class)\nv ← α·v + (1−α)·(1 − CCS)\nα: 0.9 → 1.0",
        METHOD,
        7.8,
    )
    arrow(ax, (7.75, fr_y), (8.3, fr_y), "CCS", below=True)
    box(ax, 9.5, 2.2, 2.4, 0.8, "weights ŵ = 1 + clamp(\n(v − μ_v)/σ_v, −1, 0)", METHOD, 8.5)
    arrow(ax, (9.5, fr_y - 0.48), (9.5, 2.6))
    box(ax, 9.5, 0.75, 2.4, 0.85, "L_IG = Σ ŵ · smoothL1(CR − q)", METHOD, 8.5)
    arrow(ax, (7.75, 2.3), (8.3, 0.95), "CR")
    arrow(ax, (7.75, 1.0), (8.3, 0.7), "q")
    arrow(ax, (9.5, 1.8), (9.5, 1.18))
    box(ax, 12.0, 2.2, 1.6, 0.9, "L = L_Arc\n+ λ·L_IG\n(λ = 10)", "#ffffff")
    arrow(ax, (10.7, 0.75), (11.2, 1.85))
    arrow(ax, (6.6, fr_y + 0.4), (12.0, 2.65), bend=-0.35)

    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    print(draw())
