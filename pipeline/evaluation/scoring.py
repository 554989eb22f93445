"""Run a trained FIQA model on images: quality (and embeddings) in batches.

`infer_batch` is the one place where images meet the model, used by `igfiqa score`,
`igfiqa eval` and the ONNX parity check. `score_files` scores image files and
records unreadable ones instead of stopping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.data.image_io import DecodedImage, ImageDecodeError, read_image_file
from pipeline.evaluation.mirror import with_mirror
from pipeline.evaluation.options import EvalOptions
from pipeline.parallel.env import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inference:
    """Model outputs for a set of images, in input order (with flip: combined with the mirror images')."""

    quality: np.ndarray  # [N] float32
    embeddings: np.ndarray  # [N, D] float32


@torch.no_grad()
def infer_batch(
    model: torch.nn.Module, images: np.ndarray, device: torch.device, *, flip: bool = False
) -> Inference:
    """One batch [N, 3, 112, 112] through the model (eval mode); `flip`: see `pipeline.evaluation.mirror`."""
    batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    embeddings, quality = with_mirror(model, batch, flip=flip)
    return Inference(quality.float().cpu().numpy(), embeddings.float().cpu().numpy())


def infer(
    model: torch.nn.Module,
    batches: Iterable[np.ndarray],
    device: torch.device,
    *,
    progress: tqdm | None = None,
) -> Inference:
    """Quality and embeddings of every image in `batches` (one forward pass each), concatenated in order."""
    model.eval()
    qualities, embeddings = [], []
    for images in batches:
        out = infer_batch(model, images, device)
        qualities.append(out.quality)
        embeddings.append(out.embeddings)
        if progress is not None:
            progress.update(len(images))
    if not qualities:
        return Inference(np.zeros(0, np.float32), np.zeros((0, 0), np.float32))
    return Inference(np.concatenate(qualities), np.concatenate(embeddings))


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most `size` items."""
    if size <= 0:
        raise ValueError(f"batch size {size} must be positive")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _try_read(path: Path) -> DecodedImage | ImageDecodeError:
    try:
        return read_image_file(path)
    except ImageDecodeError as exc:
        return exc


@dataclass(frozen=True)
class ScoredFiles:
    """`table`: one row per file (image, quality, height, width, resized, error); embeddings of the readable ones."""

    table: pd.DataFrame
    embeddings: np.ndarray  # rows of the readable files, in table order

    @property
    def failed(self) -> pd.DataFrame:
        return self.table[self.table["error"].notna()]


def score_files(
    model: torch.nn.Module, files: Sequence[Path], options: EvalOptions, *, workers: int = 2
) -> ScoredFiles:
    """Quality of every file; a file that cannot be read gets NaN quality and its error, and scoring goes on."""
    device = resolve_device(options.device)
    rows: list[dict] = []
    embeddings: list[np.ndarray] = []
    model.eval()
    bar = tqdm(total=len(files), desc="scoring", unit="img", disable=not options.progress)
    # PIL decodes with the GIL released for most of the work: a few threads keep the model fed.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in batched(list(files), options.batch_size):
            decoded = list(pool.map(_try_read, chunk))
            good = [(path, d) for path, d in zip(chunk, decoded, strict=True) if isinstance(d, DecodedImage)]
            if good:
                out = infer_batch(model, np.stack([d.tensor for _, d in good]), device, flip=options.flip)
                embeddings.append(out.embeddings)
                results = iter(out.quality.tolist())
            for path, d in zip(chunk, decoded, strict=True):
                if isinstance(d, DecodedImage):
                    height, width = d.original_size
                    rows.append(
                        {
                            "image": str(path),
                            "quality": float(next(results)),
                            "height": height,
                            "width": width,
                            "resized": d.resized,
                            "error": None,
                        }
                    )
                else:
                    log.debug("skipped unreadable image: %s", d)  # the caller reports the failures
                    rows.append(
                        {
                            "image": str(path),
                            "quality": float("nan"),
                            "height": None,
                            "width": None,
                            "resized": False,
                            "error": str(d),
                        }
                    )
            bar.update(len(chunk))
    bar.close()
    table = pd.DataFrame(rows, columns=["image", "quality", "height", "width", "resized", "error"])
    table = table.astype({"height": "Int64", "width": "Int64", "error": "string"})
    stacked = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
    return ScoredFiles(table, stacked)
