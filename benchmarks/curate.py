"""Benchmark `igfiqa curate score`: images/s of scoring against the forward-only bound of the same model.

Three variants over the same batches of one converted dataset, alternated round by round:

- score:        what `curate score` runs per shard (pipeline.curation.scoring.DatasetScorer):
                the shard bytes → decode-only DALI graph (threads, prefetch) → model forward
- forward_only: the same model on the same batches, already decoded and held in memory: the
                bound scoring cannot beat (ratio_vs_forward = score ÷ forward_only, ideally ~1)
- decode_only:  the DALI graph alone (the feeder, the decoder and normalisation), no model

Each variant reports its best round (the machine is shared) and its process CPU time per
image; ratio_vs_forward is taken from the best rounds, and, steadier on a loaded machine, as the
median of the per-round ratios. The model is the checkpoint given, else a freshly initialised one of configs/tiny_cpu.yaml's
architecture (speed does not depend on the weights). Without --dataset a small dataset is
synthesised. On a machine with a CUDA GPU, --device cuda runs the GPU path (mixed decoder).

Logs go to stderr; the last stdout line is one JSON object:
    {"bench": "curate", "device": "cpu", "backbone": ..., "batch": 64, "images": ..., "score_img_per_s": ...,
     "forward_img_per_s": ..., "decode_img_per_s": ..., "ratio_vs_forward": ..., "git": ...}

    .venv/bin/python benchmarks/curate.py [--dataset DIR] [--checkpoint CKPT] [--batch 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.config import load_config
from pipeline.curation.scoring import DatasetScorer, ScoringImages
from pipeline.data.dali_graph import DECODE_OUTPUT_NAMES, build_decode_pipeline
from pipeline.method.model import build_model, load_inference_model
from pipeline.parallel.env import resolve_device

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.curate")


def git_revision() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return result.stdout.strip()
    except OSError:
        return ""


def build_dataset(folder: Path, identities: int) -> Path:
    from data_prep.convert import convert
    from data_prep.synth import synthesize

    synthesize(folder / "synth", identities=identities, images_per_identity=12, seed=0)
    return convert(folder / "synth", folder / "train", samples_per_shard=5000, progress=False).root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], int], device: torch.device) -> tuple[float, float]:
    """(images/s of wall time, process CPU seconds per image) of one call returning its image count."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = run()
    _sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return images / wall, cpu / max(images, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="a converted dataset (default: synthesised)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="model to score with (default: tiny_cpu's)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    device = resolve_device(args.device)
    if args.checkpoint is not None:
        model, config = load_inference_model(args.checkpoint, device)
    else:
        config = load_config(REPO / "configs" / "tiny_cpu.yaml", [])
        torch.manual_seed(0)
        model = build_model(config.model).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or build_dataset(Path(tmp), identities=max(8, args.batch * args.batches // 10))
        images = ScoringImages(dataset)
        rows = np.arange(min(len(images), args.batch * args.batches))
        batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
        scorer = DatasetScorer(model, images, device=device, batch_size=args.batch, num_threads=args.threads)

        def decode_only() -> list[torch.Tensor]:
            fed = iter(batches)

            def source() -> tuple:
                chosen = next(fed)
                return images.encoded(chosen), chosen

            pipe = build_decode_pipeline(
                source, batch_size=args.batch, device_id=scorer.device.index if device.type == "cuda" else None,
                num_threads=args.threads, prefetch=2,
            )  # fmt: skip
            iterator = DALIGenericIterator([pipe], list(DECODE_OUTPUT_NAMES), prepare_first_batch=False)
            return [outputs["images"] for (outputs,) in iterator]

        decoded = [t.to(device).clone() for t in decode_only()]  # held for forward_only (and warm-up)
        scorer.forward(decoded[0])

        def run_score() -> int:
            return sum(len(r) for r, _ in scorer.iter_scores(batches))

        def run_forward() -> int:
            return sum(len(scorer.forward(t)) for t in decoded)

        def run_decode() -> int:
            return sum(len(t) for t in decode_only())

        variants = {"score": run_score, "forward_only": run_forward, "decode_only": run_decode}
        best = {name: (0.0, float("inf")) for name in variants}
        round_ratios = []
        for round_index in range(args.rounds):
            speeds = {}
            for name, run in variants.items():
                speed, cpu = timed(run, device)
                speeds[name] = speed
                log.info(
                    "round %d %s: %.1f images/s, %.2f ms CPU per image", round_index, name, speed, 1e3 * cpu
                )
                if speed > best[name][0]:
                    best[name] = (speed, cpu)
            round_ratios.append(speeds["score"] / speeds["forward_only"])
        images.close()
    result = {
        "bench": "curate",
        "device": device.type,
        "backbone": config.model.backbone,
        "embedding_size": config.model.embedding_size,
        "batch": args.batch,
        "images": len(rows),
        "rounds": args.rounds,
        "dali_threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "score_img_per_s": round(best["score"][0], 1),
        "forward_img_per_s": round(best["forward_only"][0], 1),
        "decode_img_per_s": round(best["decode_only"][0], 1),
        "ratio_vs_forward": round(best["score"][0] / best["forward_only"][0], 3),
        "ratio_vs_forward_median_of_rounds": round(float(np.median(round_ratios)), 3),
        "score_cpu_ms_per_img": round(1e3 * best["score"][1], 2),
        "forward_cpu_ms_per_img": round(1e3 * best["forward_only"][1], 2),
        "git": git_revision(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
