"""Cost of the sharded variance table: per-step overhead, speedup over naive recomputation, memory.

Prints logs to stderr and ONE JSON object as the last stdout line:

- overhead_fraction: (table update + weight computation) ÷ one whole training step of
  the small backbone (forward of both halves, objective, backward, SGD steps), both
  measured here in the same run (medians). Target ≤ 0.01.
- speedup_vs_naive: the table's per-step cost ÷ the naive per-step recomputation of
  every class's variance (paper eq. 6): forward the whole synthetic dataset through
  the same backbone (no grad) and compute the per-class variance of the embeddings,
  measured directly on the dataset. Target ≥ 100. (`step_speedup_vs_naive` is the
  paper-style whole-iteration comparison: (step + naive) ÷ step.)
- classifier_bytes_per_rank: float32 prototype shard of the largest rank for
  C = 85,742 (MS1M-V2), D = 512, at world sizes 1, 8, 64 (the W = 1 figure is read off
  a real classifier; momentum doubles it; the variance table adds 4 bytes per class).

    .venv/bin/python benchmarks/variance_table.py [--dataset-images 1024] [--classes 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pipeline.config import LossConfig, ModelConfig, VarianceConfig
from pipeline.evaluation.intra_class import intra_class_variance
from pipeline.method.margin_classifier import ParallelMarginClassifier
from pipeline.method.model import build_model
from pipeline.method.objective import IGFIQAObjective
from pipeline.method.variance_table import VarianceTable
from pipeline.parallel.sharding import class_range

log = logging.getLogger("bench.variance_table")
MS1M_CLASSES = 85_742


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _table_ops(
    table: VarianceTable, labels: torch.Tensor, ccs: torch.Tensor, reg_labels: torch.Tensor
) -> None:
    table.update(labels, ccs, 0.95)
    table.weights(reg_labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset-images", type=int, default=1024, help="synthetic dataset size for the naive pass"
    )
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument(
        "--half-batch", type=int, default=32, help="images per half (FR, regression) per step"
    )
    parser.add_argument("--backbone", default="iresnet_mini")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # ---- a whole training step of the small backbone
    model = build_model(ModelConfig(backbone=args.backbone)).train()
    objective = IGFIQAObjective(args.classes, 512, LossConfig(), VarianceConfig()).train()
    model_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clf_opt = torch.optim.SGD(objective.parameters(), lr=0.01, momentum=0.9)
    half = args.half_batch
    images = torch.randn(2 * half, 3, 112, 112)
    labels = torch.randint(0, args.classes, (2 * half,))

    def train_step() -> None:
        emb, quality = model(images)
        out = objective(emb[:half], labels[:half], emb[half:], quality[half:], labels[half:], 0.5)
        model_opt.zero_grad()
        clf_opt.zero_grad()
        out.total.backward()
        model_opt.step()
        clf_opt.step()

    step_s = _median_seconds(train_step, repeats=5, warmup=1)
    log.info("training step (%s, %d + %d images): %.3f s", args.backbone, half, half, step_s)

    # ---- the table's share of that step, same shapes
    table = VarianceTable(args.classes)
    ccs = torch.rand(half) * 2 - 1
    table_s = _median_seconds(lambda: _table_ops(table, labels[:half], ccs, labels[half:]), repeats=200)
    log.info("table update + weights (C=%d, B=%d): %.1f µs", args.classes, half, table_s * 1e6)

    # the same at MS1M-V2 scale and the paper's 512 + 512 batch, for reference
    big = VarianceTable(MS1M_CLASSES)
    big_labels = torch.randint(0, MS1M_CLASSES, (1024,))
    big_ccs = torch.rand(512)
    table_ms1m_s = _median_seconds(
        lambda: _table_ops(big, big_labels[:512], big_ccs, big_labels[512:]), repeats=100
    )
    log.info("table update + weights (C=85,742, B=512+512): %.1f µs", table_ms1m_s * 1e6)

    # ---- naive: forward the whole dataset and recompute every class's variance (eq. 6)
    dataset_labels = torch.arange(args.dataset_images) % args.classes
    chunk = 128

    def naive_recompute() -> None:
        model.eval()
        embeddings = []
        with torch.no_grad():
            for start in range(0, args.dataset_images, chunk):
                n = min(chunk, args.dataset_images - start)
                embeddings.append(model(torch.randn(n, 3, 112, 112))[0])
        intra_class_variance(torch.cat(embeddings), dataset_labels, args.classes)
        model.train()

    naive_s = _median_seconds(naive_recompute, repeats=2, warmup=0)
    log.info("naive recomputation over %d images: %.2f s", args.dataset_images, naive_s)

    # ---- memory of the classifier shard
    real = ParallelMarginClassifier(MS1M_CLASSES, 512)
    bytes_per_row = real.weight[0].nbytes
    per_rank = {}
    for world in (1, 8, 64):
        rows = max(class_range(MS1M_CLASSES, r, world)[1] for r in range(world))
        per_rank[str(world)] = rows * bytes_per_row
    assert per_rank["1"] == real.weight.nbytes
    log.info("classifier bytes per rank: %s", per_rank)

    result = {
        "overhead_fraction": table_s / step_s,
        "speedup_vs_naive": naive_s / table_s,
        "step_speedup_vs_naive": (step_s + naive_s) / step_s,
        "classifier_bytes_per_rank": per_rank,
        "classifier_with_momentum_bytes_per_rank": {w: 2 * b for w, b in per_rank.items()},
        "variance_table_bytes_per_rank": {
            str(w): max(class_range(MS1M_CLASSES, r, w)[1] for r in range(w)) * 4 for w in (1, 8, 64)
        },
        "train_step_seconds": step_s,
        "table_ops_seconds": table_s,
        "table_ops_seconds_ms1m_b512": table_ms1m_s,
        "naive_seconds": naive_s,
        "naive_dataset_images": args.dataset_images,
        "classes": args.classes,
        "half_batch": half,
        "backbone": args.backbone,
        "threads": args.threads,
        "device": "cpu",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
