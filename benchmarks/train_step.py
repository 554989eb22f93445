"""Training step throughput: images/s and the share of step time spent waiting for data.

Prints logs to stderr and ONE JSON object as the last stdout line:

- cpu: configs/tiny_cpu.yaml as it is (its backbone, embedding and batch) on a synthetic
  dataset made in a temporary folder. The real DALI loader feeding the real train step
  (`pipeline.training.step.TrainStep`: forward of both halves, objective, backward, clip, SGD)
  is timed side by side with the same step on one cached batch (no data loading):
  `ratio_vs_cached` = loader img/s ÷ cached img/s. Loader-fed and cached steps alternate one
  by one and the figures are medians of step times, because the machine is shared and noisy.
- gpu: when CUDA is available, iResNet-50 at a global batch of 512 (256 FR + 256
  regression) on one GPU with bf16 autocast, the same two measurements, plus the
  backbone's FLOPs per step (forward + backward, counted by
  `torch.utils.flop_counter.FlopCounterMode`), the achieved TFLOP/s and the MFU
  against this card's bf16 matmul peak measured in the same run (a large `torch.matmul`).
  Without CUDA: {"gpu": "not available"}.

    .venv/bin/python benchmarks/train_step.py [--steps 16] [--identities 100] [--gpu-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_prep.convert import convert
from data_prep.synth import synthesize
from pipeline.config import BatchLayout, TrainConfig, load_config, replace_section
from pipeline.data.loader import StepBatch
from pipeline.parallel.env import DistEnv
from pipeline.training.schedules import TrainingSchedule
from pipeline.training.step import TrainStep  # the loop's own step, not a copy of it
from pipeline.training.trainer import Trainer

log = logging.getLogger("bench.train_step")
REPO = Path(__file__).resolve().parent.parent


def _git() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_dataset(root: Path, identities: int, images_per_identity: int) -> Path:
    """A converted synthetic dataset under `root` (made once per folder)."""
    train = root / "train"
    if not (train / "dataset.json").is_file():
        log.info("synthesizing %d × %d images in %s", identities, images_per_identity, root)
        synthesize(root / "synth", identities=identities, images_per_identity=images_per_identity, seed=0)
        convert(root / "synth", train, progress=False)
    return train


def _batches(trainer: Trainer) -> Iterator[StepBatch]:
    """The loader's batches across epochs, as the loop reads them."""
    epoch = 0
    while True:
        trainer.loader.set_epoch(epoch, 0)
        yield from trainer.loader
        epoch += 1


def _timed_step(
    trainer: Trainer, batches: Iterator[StepBatch] | None, cached: StepBatch
) -> tuple[float, float]:
    """(seconds waiting for the batch, seconds of the whole step) of one step; from the loader when
    `batches` is given, else on the cached batch."""
    _sync(trainer.device)
    start = time.perf_counter()
    batch = next(batches) if batches is not None else cached
    waited = time.perf_counter() - start
    trainer.step(batch, trainer.schedule.at(0))
    _sync(trainer.device)
    return waited, time.perf_counter() - start


def measure_steps(config: TrainConfig, *, steps: int, warmup: int) -> dict[str, Any]:
    """Loader-fed vs cached-batch steps of `config` on one process, alternating step by step.

    Alternating single steps (rather than blocks) pairs each loader-fed step with a cached one
    taken moments later, so the load of a shared machine hits both alike; figures are medians.
    """
    device = torch.device("cuda", 0) if config.run.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    trainer = Trainer(config, DistEnv.single(), device, lambda: 0, "")
    trainer.ddp_model.train()
    trainer.objective.train()
    try:
        batches = _batches(trainer)
        cached = next(batches)
        for _ in range(warmup):  # DALI start-up, allocator, autocast and cuDNN caches
            _timed_step(trainer, batches, cached)
            _timed_step(trainer, None, cached)
        waits, loader_times, cached_times = [], [], []
        for index in range(steps):
            waited, seconds = _timed_step(trainer, batches, cached)
            waits.append(waited)
            loader_times.append(seconds)
            cached_times.append(_timed_step(trainer, None, cached)[1])
            log.info(
                "step %d: loader-fed %.3f s (waited %.3f s), cached %.3f s",
                index,
                seconds,
                waited,
                cached_times[-1],
            )
        loader_step, cached_step = statistics.median(loader_times), statistics.median(cached_times)
        return {
            "device": str(device),
            "backbone": config.model.backbone,
            "batch": trainer.layout.global_batch,
            "steps": steps,
            "img_per_s": round(trainer.layout.global_batch / loader_step, 2),
            "data_wait_frac": round(sum(waits) / sum(loader_times), 4),
            "cached_img_per_s": round(trainer.layout.global_batch / cached_step, 2),
            "ratio_vs_cached": round(cached_step / loader_step, 3),
            "trainer": trainer,
            "cached_batch": cached,
        }
    finally:
        trainer.loader.close()
        trainer.monitor.close()


def _config(base: Path, dataset: Path, work: Path, overrides: list[str]) -> TrainConfig:
    config = load_config(base, overrides)
    return replace_section(
        config,
        data={"dataset": str(dataset)},
        run={
            "dir": str(work / "run"),
            "tracking_uri": "off",
            "log_every": 1_000_000,
            "checkpoint_every_steps": 0,
            "checkpoint_every_minutes": 0.0,
        },
    )


def step_flops(step: TrainStep, images: torch.Tensor) -> int:
    """FLOPs of one forward + backward of backbone and head on a step's images (bf16 autocast)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device_type=step.device.type, dtype=torch.bfloat16, enabled=step.autocast):
            embeddings, quality = step.model(images)
        (embeddings.float().square().mean() + quality.float().mean()).backward()
    step.model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def synthetic_steps(
    config: TrainConfig, *, steps: int, warmup: int, num_classes: int, device: torch.device
) -> dict[str, Any]:
    """The loop's own step (`TrainStep`) on one batch of random device tensors: no data loading.

    What a lent GPU machine without DALI can measure: compute only, `data_wait_frac` unknown.
    """
    step = TrainStep(config, num_classes, device, world_size=1)
    step.train()
    data = config.data
    layout = BatchLayout.of(data, 1, num_images=data.fr_batch + data.reg_batch)  # a data set of one step
    fr, batch = layout.fr_batch, layout.global_batch
    images = torch.rand(batch, 3, 112, 112, device=device) * 2 - 1
    labels = torch.randint(0, num_classes, (batch,), device=device)
    values = TrainingSchedule(config.optim, config.variance, 100, 1000).at(0)
    times = []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step(images[:fr], labels[:fr], images[fr:], labels[fr:], values)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "device": str(device),
        "backbone": config.model.backbone,
        "batch": batch,
        "steps": steps,
        "data": "synthetic device tensors (no DALI on this machine): data_wait_frac not measured",
        "cached_img_per_s": round(batch / seconds, 2),
        "step": step,
        "images": images,
    }


def matmul_peak_tflops(device: torch.device, size: int = 8192, iters: int = 50) -> float:
    """Measured bf16 dense matmul throughput of this card (TFLOP/s)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    torch.cuda.synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def gpu_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """iResNet-50, 256 + 256 images per step, bf16 autocast, on GPU 0: DALI-fed when DALI is
    installed, else on synthetic device tensors."""
    overrides = ["data.num_classes=0", "data.fr_batch=256", "data.reg_batch=256", "model.fp16=true"]
    overrides += [f"data.num_threads={args.gpu_threads}", "run.device=cuda"]
    if importlib.util.find_spec("nvidia.dali") is not None:
        dataset = make_dataset(work / "gpu-data", args.gpu_identities, args.images_per_identity)
        config = _config(REPO / "configs" / "protocol_s.yaml", dataset, work / "gpu", overrides)
        result = measure_steps(config, steps=args.gpu_steps, warmup=args.warmup)
        trainer, batch = result.pop("trainer"), result.pop("cached_batch")
        step, images = trainer.train_step, torch.cat([batch.fr.images, batch.reg.images])
        rate = result["img_per_s"]
    else:
        config = _config(REPO / "configs" / "protocol_s.yaml", work / "none", work / "gpu", overrides)
        torch.cuda.set_device(0)
        result = synthetic_steps(
            config,
            steps=args.gpu_steps,
            warmup=args.warmup,
            num_classes=10572,
            device=torch.device("cuda", 0),
        )
        step, images = result.pop("step"), result.pop("images")
        rate = result["cached_img_per_s"]
    flops = step_flops(step, images)
    peak = matmul_peak_tflops(step.device)
    achieved = flops * rate / result["batch"] / 1e12
    achieved_cached = flops * result["cached_img_per_s"] / result["batch"] / 1e12
    result.update(
        {
            "gpu_name": torch.cuda.get_device_name(step.device),
            "autocast": "bf16",
            "backbone_flops_per_step": flops,
            "tflops": round(achieved, 1),
            "tflops_cached": round(achieved_cached, 1),
            "matmul_peak_tflops": round(peak, 1),
            "mfu": round(achieved / peak, 4),
            "mfu_cached": round(achieved_cached / peak, 4),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=16, help="timed (loader-fed, cached) step pairs on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--identities", type=int, default=100, help="synthetic identities (CPU part)")
    parser.add_argument("--images-per-identity", type=int, default=12)
    parser.add_argument("--gpu-identities", type=int, default=200)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-threads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU part (a lent GPU machine)")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep data and runs here (default: a temp dir)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as temp:
        work = args.work or Path(temp)
        cpu: dict[str, Any] = {"cpu": "skipped (--gpu-only)"}
        if not args.gpu_only:
            dataset = make_dataset(work / "cpu-data", args.identities, args.images_per_identity)
            config = _config(
                REPO / "configs" / "tiny_cpu.yaml",
                dataset,
                work / "cpu",
                ["run.device=cpu", "data.num_classes=0"],
            )
            cpu = measure_steps(config, steps=args.steps, warmup=args.warmup)
            cpu.pop("trainer")
            cpu.pop("cached_batch")
            cpu["torch_threads"] = torch.get_num_threads()
        gpu: dict[str, Any] = {"gpu": "not available"}
        if torch.cuda.is_available():
            gpu = gpu_benchmark(args, work)
    print(json.dumps({"bench": "train_step", "cpu": cpu, "gpu": gpu, "git": _git()}))


if __name__ == "__main__":
    main()
