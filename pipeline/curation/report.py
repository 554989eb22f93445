"""The pictures of a curation a person looks at (`igfiqa curate filter` writes them to OUT/report/).

- `quality_histogram.png`: the quality of every source image, kept and removed stacked, with the
  rule's cut; beside it the distribution per identity size (images per identity, in the buckets of
  `prep inspect`), each normalised, so a size that scores lower shows.
- `quality_deciles.png`: sample images of every quality decile, lowest decile first (top row),
  each captioned with its score (and, given `captions`, e.g. the synthetic ground truth); images
  the rule removed are framed red.
- `curation_removed.png`: what the rule removed: images (by the rule, with their identity, given
  back) and identities, the share removed per identity, and identity sizes before and after.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.curate import REMOVED_BY_RULE, REMOVED_WITH_IDENTITY, CurationPlan
from data_prep.inspect import CLASS_SIZE_BUCKETS
from data_prep.shard_reader import ShardReader

HISTOGRAM_FILE = "quality_histogram.png"
DECILES_FILE = "quality_deciles.png"
REMOVED_FILE = "curation_removed.png"
DECILES = 10
SAMPLES_PER_DECILE = 10
TILE_INCHES = 1.05
KEPT_COLOUR, RULE_COLOUR, IDENTITY_COLOUR, RESTORED_COLOUR = "#4c72b0", "#c44e52", "#dd8452", "#55a868"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class CurationReport:
    """The PNGs written."""

    histogram: Path
    deciles: Path
    removed: Path

    def all_files(self) -> list[Path]:
        return [self.histogram, self.deciles, self.removed]


def size_buckets(sizes: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, bool mask over identities) of every non-empty identity-size bucket of `prep inspect`."""
    found = []
    for low, high in CLASS_SIZE_BUCKETS:
        mask = (sizes >= low) & (sizes <= (high if high is not None else np.iinfo(np.int64).max))
        if mask.any():
            name = f"{low}" if low == high else (f"{low}–{high}" if high else f"> {low - 1}")
            found.append((name, mask))
    return found


def _cut_value(plan: CurationPlan) -> float | None:
    """The quality the rule cut at (a global rule only): the threshold, or the highest removed score."""
    if plan.rule.kind == "below":
        return plan.rule.value
    if plan.rule.kind == "lowest":
        removed = plan.quality[plan.selection.reason == REMOVED_BY_RULE]
        return float(removed.max()) if removed.size else None
    return None


def plot_histogram(plan: CurationPlan, path: Path) -> Path:
    """Overall quality histogram (kept / removed stacked) and one curve per identity-size bucket."""
    plt = _pyplot()
    quality, sel = plan.quality, plan.selection
    labels = plan.manifest["label"].to_numpy(dtype=np.int64)
    bins = np.histogram_bin_edges(quality, bins=min(60, max(10, len(quality) // 40)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    parts = [
        (sel.keep, KEPT_COLOUR, "kept"),
        (sel.reason == REMOVED_BY_RULE, RULE_COLOUR, "removed by the rule"),
        (sel.reason == REMOVED_WITH_IDENTITY, IDENTITY_COLOUR, "removed with its identity"),
    ]
    shown = [(quality[m], c, f"{name} ({int(m.sum())})") for m, c, name in parts if m.any()]
    left.hist(
        [q for q, _, _ in shown],
        bins=bins,
        stacked=True,
        color=[c for _, c, _ in shown],
        label=[n for _, _, n in shown],
    )
    cut = _cut_value(plan)
    if cut is not None:
        left.axvline(cut, color="black", linestyle="--", linewidth=1, label=f"cut at {cut:.3g}")
    left.set_xlabel("quality (model score, higher = better)")
    left.set_ylabel("images")
    left.set_title(f"{len(quality)} images of {plan.source.root.name}: {plan.rule.describe()}", fontsize=8)
    left.legend(fontsize=7)
    sizes = sel.source_counts
    for name, mask in size_buckets(sizes):
        in_bucket = mask[labels]
        right.hist(
            quality[in_bucket],
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.4,
            label=f"{name} images/identity ({int(mask.sum())} ids, {int(in_bucket.sum())} images)",
        )
    right.set_xlabel("quality")
    right.set_ylabel("density (each curve sums to 1)")
    right.set_title("quality per identity size (images per identity in the source)", fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def decile_samples(quality: np.ndarray, *, samples: int = SAMPLES_PER_DECILE) -> list[np.ndarray]:
    """Rows of `samples` images per quality decile, lowest decile first, evenly spread inside it
    (by rank; ties in manifest order)."""
    order = np.lexsort((np.arange(len(quality)), quality))
    edges = np.linspace(0, len(quality), DECILES + 1).round().astype(np.int64)
    picked = []
    for start, stop in zip(edges[:-1].tolist(), edges[1:].tolist()):
        if stop <= start:
            picked.append(np.zeros(0, dtype=np.int64))
            continue
        ranks = np.unique(np.linspace(start, stop - 1, min(samples, stop - start)).round().astype(np.int64))
        picked.append(order[ranks])
    return picked


def _pixels(reader: ShardReader, plan: CurationPlan, row: int) -> np.ndarray:
    from PIL import Image

    m = plan.manifest
    data = reader.read(int(m["shard"].iloc[row]), int(m["offset"].iloc[row]), int(m["nbytes"].iloc[row]))
    with Image.open(io.BytesIO(data.tobytes())) as image:
        return np.asarray(image.convert("RGB"))


def plot_deciles(
    plan: CurationPlan,
    path: Path,
    *,
    captions: Mapping[int, str] | None = None,
    samples: int = SAMPLES_PER_DECILE,
) -> Path:
    """The decile grid; `captions`: extra text per source record (e.g. the known degradation)."""
    plt = _pyplot()
    rows = decile_samples(plan.quality, samples=samples)
    records = plan.manifest["record"].to_numpy(dtype=np.int64)
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        DECILES, n_cols, figsize=(TILE_INCHES * n_cols + 1.2, TILE_INCHES * 1.3 * DECILES), squeeze=False
    )
    with ShardReader(plan.source.tar_paths) as reader:
        for d, picked in enumerate(rows):
            if picked.size:
                low, high = plan.quality[picked].min(), plan.quality[picked].max()
                axes[d][0].annotate(
                    f"decile {d + 1}\n{low:.3g}…{high:.3g}",
                    xy=(-0.12, 0.5),
                    xycoords="axes fraction",
                    ha="right",
                    va="center",
                    fontsize=7,
                )
            for c in range(n_cols):
                ax = axes[d][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(picked):
                    ax.axis("off")
                    continue
                row = int(picked[c])
                ax.imshow(_pixels(reader, plan, row))
                removed = not plan.selection.keep[row]
                text = f"{plan.quality[row]:.3g}"
                if captions is not None and int(records[row]) in captions:
                    text += f"\n{captions[int(records[row])]}"
                ax.set_title(text, fontsize=6, color=RULE_COLOUR if removed else "black")
                for spine in ax.spines.values():
                    spine.set_color(RULE_COLOUR if removed else "#bbbbbb")
                    spine.set_linewidth(2.0 if removed else 0.5)
    fig.suptitle(
        "sample images per quality decile, lowest first (red frame: removed by the curation)", fontsize=9
    )
    fig.tight_layout(rect=(0.06, 0, 1, 0.98))
    return _save(fig, path)


def plot_removed(plan: CurationPlan, path: Path) -> Path:
    """Counts removed (images by reason, identities), share removed per identity, sizes before/after."""
    plt = _pyplot()
    sel = plan.selection
    counts = sel.counts()
    labels = plan.manifest["label"].to_numpy(dtype=np.int64)
    fig, (bars, share, sizes_ax) = plt.subplots(1, 3, figsize=(14, 4))
    names = [
        "images kept",
        "removed by rule",
        "removed with identity",
        "given back",
        "",
        "identities kept",
        "identities removed",
    ]
    values = [
        counts["images"],
        counts["removed_by_rule"],
        counts["removed_with_identity"],
        counts["restored"],
        0,
        counts["classes"],
        counts["removed_classes"],
    ]
    colours = [KEPT_COLOUR, RULE_COLOUR, IDENTITY_COLOUR, RESTORED_COLOUR, "white", KEPT_COLOUR, RULE_COLOUR]
    positions = np.arange(len(names))
    bars.barh(positions, values, color=colours)
    for y, v, n in zip(positions, values, names):
        if n:
            bars.text(v, y, f" {v}", va="center", fontsize=7)
    bars.set_yticks(positions, names, fontsize=7)
    bars.invert_yaxis()
    bars.set_title(plan.rule.describe(), fontsize=7)
    present = sel.source_counts > 0
    kept_per_class = np.bincount(labels[sel.keep], minlength=len(sel.source_counts))
    removed_share = 1.0 - kept_per_class[present] / sel.source_counts[present]
    share.hist(removed_share, bins=np.linspace(0, 1, 21), color=RULE_COLOUR)
    share.set_xlabel("share of an identity's images removed")
    share.set_ylabel("identities")
    share.set_title(f"{int(present.sum())} identities in the source", fontsize=8)
    top = int(sel.source_counts.max(initial=1))
    size_bins = np.arange(0.5, top + 1.5, max(1, top // 30))
    sizes_ax.hist(
        sel.source_counts[present],
        bins=size_bins,
        histtype="step",
        linewidth=1.5,
        color="#555555",
        label="source",
    )
    sizes_ax.hist(
        kept_per_class[kept_per_class > 0],
        bins=size_bins,
        histtype="step",
        linewidth=1.5,
        color=KEPT_COLOUR,
        label="curated",
    )
    sizes_ax.set_xlabel("images per identity")
    sizes_ax.set_ylabel("identities")
    sizes_ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_curation_report(
    plan: CurationPlan, out_dir: Path, *, captions: Mapping[int, str] | None = None
) -> CurationReport:
    """The three PNGs of a curation into `out_dir`."""
    out_dir = Path(out_dir)
    return CurationReport(
        histogram=plot_histogram(plan, out_dir / HISTOGRAM_FILE),
        deciles=plot_deciles(plan, out_dir / DECILES_FILE, captions=captions),
        removed=plot_removed(plan, out_dir / REMOVED_FILE),
    )
