"""A picture of what the regression half sees: per identity, the clean image beside degraded versions.

Every tile goes through the training DALI graph (`pipeline.data.dali_graph`) on the CPU,
with augmentations drawn exactly as training draws them (`pipeline.data.augment_plan`),
and is captioned with what it received (flip, rescale side, erase size, color factors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.data.augment_plan import AugmentParams, draw_params
from pipeline.data.dali_graph import PIXEL_MEAN, PIXEL_STD, GraphBatch, run_graph
from pipeline.data.image_store import ImageStore
from pipeline.data.sampler import stream_rng

PREVIEW_STREAM = 2  # generator stream of the preview (training uses 0 and 1)
TILE_INCHES = 1.6  # size of one tile in the figure


@dataclass(frozen=True)
class PreviewTile:
    """One picture of the grid."""

    key: str
    label: int
    caption: str
    flags: tuple[bool, bool, bool]  # rescale, erase, color
    pixels: np.ndarray  # uint8 [H, W, 3], as the network sees it (before normalisation)


def preview_tiles(
    dataset_dir: str | Path, augment: AugmentConfig, *, identities: int = 6, versions: int = 5, seed: int = 0
) -> list[list[PreviewTile]]:
    """Rows of tiles: one identity per row, its clean image first, then `versions` regression-half versions."""
    if identities < 1 or versions < 1:
        raise ValueError(f"need at least one identity and one version, got {identities} and {versions}")
    store = ImageStore(dataset_dir)
    try:
        rng = stream_rng(seed, PREVIEW_STREAM)
        labels = np.unique(store.labels)
        chosen = rng.choice(labels, size=min(identities, len(labels)), replace=False)
        rows = np.array(
            [rng.choice(np.flatnonzero(store.labels == label)) for label in chosen], dtype=np.int64
        )
        size = store.image_size[0]
        per_row = versions + 1
        params = draw_params(augment, size, len(rows) * per_row, rng)
        clean = np.arange(len(params)) % per_row == 0
        params = dataclasses.replace(params, flags=params.flags & ~clean[:, None], flip=params.flip & ~clean)
        all_rows = np.repeat(rows, per_row)
        batch = GraphBatch(encoded=store.encoded(all_rows), rows=all_rows, params=params)
        images = run_graph(batch, image_size=size)["images"]
        keys = store.keys_of(all_rows)
    finally:
        store.close()
    tiles = [
        _tile(keys[i], int(store.labels[all_rows[i]]), params, i, images[i]) for i in range(len(all_rows))
    ]
    return [tiles[r * per_row : (r + 1) * per_row] for r in range(len(rows))]


def _tile(key: str, label: int, params: AugmentParams, i: int, image: np.ndarray) -> PreviewTile:
    pixels = np.clip(np.rint(image * PIXEL_STD + PIXEL_MEAN), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    flags = tuple(bool(f) for f in params.flags[i])
    return PreviewTile(key=key, label=label, caption=params.describe(i), flags=flags, pixels=pixels)  # type: ignore[arg-type]


def render_grid(rows: list[list[PreviewTile]], out: str | Path) -> Path:
    """Draw the tiles as a captioned grid into an image file (format from the suffix, e.g. .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(TILE_INCHES * n_cols, TILE_INCHES * 1.25 * n_rows), squeeze=False
    )
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            tile = row[c]
            ax.imshow(tile.pixels)
            title = f"id {tile.label} · clean" if c == 0 else tile.caption.replace(" · ", "\n")
            ax.set_title(title, fontsize=6)
    fig.suptitle("clean image | regression-half versions (flip, rescale, erase, color)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_preview(
    dataset_dir: str | Path,
    out: str | Path,
    augment: AugmentConfig,
    *,
    identities: int = 6,
    versions: int = 5,
    seed: int = 0,
) -> Path:
    """`igfiqa data preview`: tiles of `dataset_dir` rendered to `out`."""
    rows = preview_tiles(dataset_dir, augment, identities=identities, versions=versions, seed=seed)
    return render_grid(rows, out)
