"""Partial FC: what sampled NNCCS does to CR on a trained model, and what each mode costs per step.

Prints logs to stderr and ONE JSON object as the last stdout line:

- cr_error: a trained checkpoint's backbone embeds the images of its training set (the
  converted folder its config names, or --dataset); its classifier gives every image's CCS
  and exact NNCCS (the nearest other class centre, over all C classes) and CR = CCS /
  (NNCCS + 1 + ε). Then, per sample rate, the images go through in seeded random batches of
  --batch, and each batch's NNCCS is taken over a Partial FC sample as training draws it
  (`pipeline.method.partial_fc.draw_rows`: the batch's classes plus random others, ceil(rate
  × C) rows in all, or the batch's class count if larger). Reported: the mean and 99th
  percentile of |CR_sampled − CR_exact|, and how often the nearest class is missed. A small
  --batch keeps the sample mostly random rows, as at scale (a few hundred positives in a
  shard of 10^4-10^5 rows); the checkpoint's C is small, so its sample holds fewer rows than
  a large C would at the same rate (see the README's design table on what that means).
- step_time: the objective's step alone (sharded classifier forward with the margin, CR
  statistics, variance table, backward, SGD incl. the sampled rows' update) on random
  embeddings at C = --classes, D = --dim on CPU, for sample_rate 1 and, per rate, NNCCS
  exact and sampled. Modes alternate step by step (the machine is shared); medians.

    .venv/bin/python benchmarks/partial_fc.py --checkpoint work/matchers/runs/X/checkpoints/last.ckpt
    .venv/bin/python benchmarks/partial_fc.py --checkpoint CKPT --classes 100000 --dim 512 --steps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import load_checkpoint
from pipeline.config import LossConfig, PartialFCConfig, VarianceConfig
from pipeline.curation.scoring import DatasetScorer, ScoringImages, shard_batches
from pipeline.method.model import inference_model_from_state
from pipeline.method.objective import IGFIQAObjective
from pipeline.method.partial_fc import draw_rows

log = logging.getLogger("bench.partial_fc")
RATES = (0.1, 0.3)


class _Embedder(nn.Module):
    """The backbone's embeddings in the place where DatasetScorer reads the quality."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.backbone(images)


def _embed(state: dict[str, Any], dataset: Path, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = inference_model_from_state(state)
    images = ScoringImages(dataset)
    try:
        batches = shard_batches(images, range(len(images.info.shards)), 256)
        embeddings, rows = [], []
        for got_rows, emb in DatasetScorer(
            _Embedder(model.backbone), images, device=torch.device("cpu")
        ).iter_scores(batches):
            rows.append(got_rows)
            embeddings.append(emb)
            if sum(map(len, rows)) >= limit:
                break
        row = np.concatenate(rows)
        labels = torch.from_numpy(images.labels[images.held(row)])
    finally:
        images.close()
    return torch.from_numpy(np.concatenate(embeddings)), labels


def cr_error(checkpoint: Path, dataset: Path | None, batch: int, limit: int, eps: float) -> dict[str, Any]:
    """Error of sampled NNCCS in CR against the exact one, on the checkpoint's own training images."""
    state = load_checkpoint(checkpoint)
    folder = dataset or Path(state["config"]["data"]["dataset"])
    embeddings, labels = _embed(state, folder, limit)
    weight = F.normalize(state["classifier"].float(), dim=1)
    classes = weight.shape[0]
    cos = F.normalize(embeddings, dim=1) @ weight.T
    ccs = cos.gather(1, labels[:, None]).squeeze(1)
    others = cos.scatter(1, labels[:, None], -math.inf)
    nnccs, nearest = others.max(dim=1)
    cr = ccs / (nnccs + 1 + eps)
    log.info(
        "%d images of %d classes, D = %d; CR mean %.4f",
        len(labels),
        classes,
        weight.shape[1],
        float(cr.mean()),
    )
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "classes": classes,
        "dim": int(weight.shape[1]),
        "images": len(labels),
        "batch": batch,
        "cr_exact_mean": round(float(cr.mean()), 5),
        "nnccs_exact_mean": round(float(nnccs.mean()), 5),
    }
    generator = torch.Generator().manual_seed(0)
    for rate in RATES:
        order = torch.randperm(len(labels), generator=generator)
        sampled = torch.empty_like(nnccs)
        missed = torch.zeros(len(labels), dtype=torch.bool)
        for step, start in enumerate(range(0, len(order), batch)):
            idx = order[start : start + batch]
            count = max(math.ceil(round(rate * classes, 6)), int(labels[idx].unique().numel()))
            rows = draw_rows(labels[idx], classes, count, seed=step)
            sub = others[idx][:, rows]
            sampled[idx] = sub.max(dim=1).values
            missed[idx] = ~torch.isin(nearest[idx], rows)
        cr_s = ccs / (sampled + 1 + eps)
        err = (cr_s - cr).abs()
        out[f"rate_{rate}"] = {
            "sample_rows": math.ceil(round(rate * classes, 6)),
            "cr_abs_err_mean": round(float(err.mean()), 5),
            "cr_abs_err_p99": round(float(err.quantile(0.99)), 5),
            "cr_rel_err_mean": round(float((err / cr.abs().clamp_min(1e-6)).mean()), 5),
            "nearest_missed": round(float(missed.float().mean()), 4),
            "cr_sampled_mean": round(float(cr_s.mean()), 5),
        }
        log.info("rate %.1f: %s", rate, out[f"rate_{rate}"])
    return out


def build_step(classes: int, dim: int, pfc: PartialFCConfig) -> tuple[IGFIQAObjective, torch.optim.SGD]:
    """The objective at C = `classes`, D = `dim` with `pfc`, and its classifier's SGD (as training builds them)."""
    objective = IGFIQAObjective(classes, dim, LossConfig(partial_fc=pfc), VarianceConfig(), seed=0).train()
    return objective, torch.optim.SGD(objective.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def step_inputs(classes: int, dim: int, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One step's random FR and regression embeddings, labels and qualities (`batch` of each half)."""
    fr = torch.randn(batch, dim, generator=generator)
    reg = torch.randn(batch, dim, generator=generator)
    labels = torch.randint(0, classes, (2 * batch,), generator=generator)
    quality = torch.rand(batch, generator=generator)
    return {
        "fr": fr,
        "reg": reg,
        "fr_labels": labels[:batch],
        "reg_labels": labels[batch:],
        "quality": quality,
    }


def timed_step(
    objective: IGFIQAObjective, opt: torch.optim.SGD, inputs: dict[str, torch.Tensor], step: int
) -> float:
    """Seconds of one objective step: forward (classifier, CR statistics, table), backward, SGD."""
    emb = inputs["fr"].clone().requires_grad_(True)
    start = time.perf_counter()
    out = objective(
        emb, inputs["fr_labels"], inputs["reg"], inputs["quality"], inputs["reg_labels"], 0.9, step=step
    )
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    opt.step()
    objective.classifier.step_sampled_rows(opt)
    return time.perf_counter() - start


def step_modes(rates: tuple[float, ...] = RATES) -> dict[str, PartialFCConfig]:
    """Sample rate 1 ("rate_1.0") and, per rate, exact and sampled NNCCS ("rate_0.1_exact", ...)."""
    modes = {"rate_1.0": PartialFCConfig()}
    for rate in rates:
        for nnccs in ("exact", "sampled"):
            modes[f"rate_{rate}_{nnccs}"] = PartialFCConfig(sample_rate=rate, nnccs=nnccs)  # type: ignore[arg-type]
    return modes


def step_time(
    classes: int, dim: int, batch: int, steps: int, modes: dict[str, PartialFCConfig] | None = None
) -> dict[str, Any]:
    """Median seconds of the objective's step per mode (`step_modes()` by default, "rate_1.0"
    among them), alternating modes step by step; all modes are held in memory at once."""
    modes = step_modes() if modes is None else modes
    built = {name: build_step(classes, dim, pfc) for name, pfc in modes.items()}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for step in range(steps + 1):  # step 0 warms up (allocations, the momentum buffer)
        inputs = step_inputs(classes, dim, batch, g)
        for name, (objective, opt) in built.items():
            seconds = timed_step(objective, opt, inputs, step)
            if step:
                times[name].append(seconds)
        log.info("step %d: %s", step, {n: round(t[-1], 3) for n, t in times.items() if t})
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["rate_1.0"]
    return {
        "classes": classes,
        "dim": dim,
        "batch_fr": batch,
        "batch_reg": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "median_s": {name: round(t, 4) for name, t in med.items()},
        "speedup_vs_rate_1": {name: round(base / t, 2) for name, t in med.items()},
        "step_s": {name: [round(x, 3) for x in t] for name, t in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint (read only)")
    parser.add_argument("--dataset", type=Path, default=None, help="its training set (default: its config's)")
    parser.add_argument("--batch", type=int, default=8, help="images per Partial FC draw in cr_error (8)")
    parser.add_argument("--images", type=int, default=100_000, help="at most this many images (100000)")
    parser.add_argument("--classes", type=int, default=100_000, help="C of the step timing (100000)")
    parser.add_argument("--dim", type=int, default=512, help="D of the step timing (512)")
    parser.add_argument("--step-batch", type=int, default=128, help="global FR and regression halves (128)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode after one warm-up (3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    result = {
        "cr_error": cr_error(args.checkpoint, args.dataset, args.batch, args.images, LossConfig().cr_eps),
        "step_time": step_time(args.classes, args.dim, args.step_batch, args.steps),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
