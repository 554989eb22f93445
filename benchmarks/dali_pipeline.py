"""Benchmark the regression-half DALI pipeline against PIL + a torch DataLoader and against decode only.

All variants read the same samples of one converted dataset with the same augmentation
plan (flip, then rescale / erase / color each with p = 0.3, drawn once in numpy), the
same batch size and the same number of threads/workers, and deliver torch tensors:

- dali_regression:        the training graph (pipeline.data.dali_graph), every row a regression row
- dali_decode_only:       the same feeder (reader) + fn.decoders.image, uint8 HWC out as decoded
- dali_decode_normalise:  decode + crop_mirror_normalize (the tensor format, no augmentation)
- pil_dataloader:         PIL decode, resize down (nearest) / up (bilinear), the same color
                          jitter (ImageEnhance.Color for saturation, one lookup table for
                          contrast and brightness), zeroed rectangle, flip, normalise, in a
                          torch DataLoader with the same number of workers

All DALI variants use the same executor settings (threads, prefetch, exec_dynamic) and so
the same hand-off to torch (DALIGenericIterator: DLPack, no copy, under exec_dynamic).
Rounds alternate the variants; each reports its best round (the machine is shared).

--profile times instead the training graph with one degradation at p = 1 and the others
off, against all off, and reports each degradation's cost in µs per image (wall and
process CPU; the CPU figure is steadier on a loaded machine).
Without --dataset a dataset is synthesised: data_prep.synth_faces faces with mild sensor noise
so the JPEGs (~6 kB) are about as large as real 112×112 face crops.

Logs go to stderr; the last stdout line is one JSON object with images/s per variant,
ratio_vs_pil = dali_regression ÷ pil_dataloader (target ≥ 1.5) and
ratio_vs_decode_only = dali_regression ÷ dali_decode_only (target ≥ 0.4), both from each
variant's best round, and two steadier readings of the latter for a loaded machine: the
median of the per-round ratios and the ratio of process CPU time per image.
On a machine with a CUDA GPU it also reports the GPU variant's images/s.

    .venv/bin/python benchmarks/dali_pipeline.py [--dataset DIR] [--batch 256] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.augment_plan import AugmentParams, draw_params
from pipeline.data.dali_graph import (
    CONTRAST_CENTER,
    OUTPUT_NAMES,
    PIXEL_MEAN,
    PIXEL_STD,
    GraphBatch,
    build_pipeline,
)
from pipeline.data.image_store import ImageStore
from pipeline.data.sampler import stream_rng

log = logging.getLogger("bench.dali_pipeline")
SIZE = 112
NOISE_SIGMA = 5.0  # grey levels of sensor noise added to the synthetic faces


# ----------------------------------------------------------------------------- data


def build_dataset(folder: Path) -> Path:
    """Synthetic faces with mild noise, written as InsightFace RecordIO and converted to shards."""
    from data_prep.convert import convert
    from data_prep.synth import write_insightface_recordio
    from data_prep.synth_faces import draw_traits, draw_variation, encode_jpeg, render_face

    rng = np.random.default_rng(0)
    classes = []
    for _ in range(120):
        traits = draw_traits(rng)
        faces = []
        for _ in range(12):
            pixels = render_face(traits, draw_variation(rng), size=SIZE).astype(np.float32)
            pixels += rng.normal(0.0, NOISE_SIGMA, pixels.shape).astype(np.float32)
            faces.append(encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8)))
        classes.append(faces)
    source = folder / "source"
    source.mkdir(parents=True)
    write_insightface_recordio(source, classes, image_size=SIZE)
    convert(source, folder / "train", progress=False)
    return folder / "train"


class Plan:
    """The rows and augmentation of every image of one round, fixed for all variants."""

    def __init__(self, store: ImageStore, images: int, batch: int, augment: AugmentConfig) -> None:
        rng = stream_rng(0, 7)
        self.batch = batch
        self.rows = rng.integers(0, len(store), images).astype(np.int64)
        self.params = draw_params(augment, SIZE, images, rng)

    @property
    def batches(self) -> int:
        return len(self.rows) // self.batch

    def slice(self, b: int) -> tuple[np.ndarray, AugmentParams]:
        part = slice(b * self.batch, (b + 1) * self.batch)
        return self.rows[part], self.params.take(part)


class Feeder:
    """external_source callback over the plan; rewind() before each round."""

    def __init__(self, store: ImageStore, plan: Plan) -> None:
        self.store, self.plan, self.next = store, plan, 0

    def rewind(self) -> None:
        self.next = 0

    def __call__(self) -> tuple:
        if self.next >= self.plan.batches:
            raise StopIteration
        rows, params = self.plan.slice(self.next)
        self.next += 1
        return GraphBatch(encoded=self.store.encoded(rows), rows=rows, params=params).as_inputs()


# ----------------------------------------------------------------------------- DALI variants


@pipeline_def
def _decode_graph(source: Callable[[], tuple], normalise: bool, on_gpu: bool):
    encoded, rows, *_unused = fn.external_source(source=source, num_outputs=13, batch=True)
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    if normalise:
        images = fn.crop_mirror_normalize(
            images, mean=[PIXEL_MEAN] * 3, std=[PIXEL_STD] * 3, output_layout="CHW", dtype=types.FLOAT
        )
    return images, rows


class DaliRunner:
    """A DALI pipeline wrapped in the PyTorch plugin iterator; each round drains one pass of the plan."""

    def __init__(self, feeder: Feeder, pipe, outputs: list[str]) -> None:
        self.feeder = feeder
        self.iterator = DALIGenericIterator([pipe], outputs, prepare_first_batch=False)
        self.started = False

    def run_round(self) -> int:
        if self.started:
            self.feeder.rewind()
            self.iterator.reset()
        self.started = True
        count = 0
        for (batch,) in self.iterator:
            count += batch["images"].shape[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count


def dali_runner(kind: str, store: ImageStore, plan: Plan, threads: int, device_id: int | None) -> DaliRunner:
    feeder = Feeder(store, plan)
    common = {"batch_size": plan.batch, "num_threads": threads, "device_id": device_id}
    if kind == "regression":
        pipe = build_pipeline(feeder, image_size=SIZE, prefetch=2, **common)
        return DaliRunner(feeder, pipe, list(OUTPUT_NAMES))
    pipe = _decode_graph(
        feeder,
        kind == "decode_normalise",
        device_id is not None,
        prefetch_queue_depth=2,
        exec_dynamic=True,  # as build_pipeline
        **common,
    )
    return DaliRunner(feeder, pipe, ["images", "rows"])


# ----------------------------------------------------------------------------- PIL baseline


class PilDataset(torch.utils.data.Dataset):
    """The same decode + augmentation + normalisation in PIL/numpy, one sample per __getitem__."""

    def __init__(self, dataset_dir: Path, plan: Plan) -> None:
        self.dataset_dir, self.plan = dataset_dir, plan
        self.store: ImageStore | None = None  # opened in each worker (memory maps do not pickle)

    def __len__(self) -> int:
        return self.plan.batches * self.plan.batch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "store": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.store is None:
            self.store = ImageStore(self.dataset_dir)
        p = self.plan.params
        (data,) = self.store.encoded(self.plan.rows[i : i + 1])
        image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        if p.flags[i, 0]:
            side = int(p.rescale_size[i, 0])
            image = image.resize((side, side), Image.NEAREST).resize((SIZE, SIZE), Image.BILINEAR)
        if p.flags[i, 2]:
            brightness, contrast, saturation = (float(v) for v in p.color[i])
            image = ImageEnhance.Color(image).enhance(saturation)
            levels = np.arange(256, dtype=np.float64)
            table = brightness * (contrast * (levels - CONTRAST_CENTER) + CONTRAST_CENTER)
            image = image.point(np.clip(np.rint(table), 0, 255).astype(np.uint8).tolist() * 3)
        pixels = np.asarray(image)
        if p.flags[i, 1]:
            pixels = pixels.copy()
            (y, x), (h, w) = p.erase_anchor[i].astype(int), p.erase_shape[i].astype(int)
            pixels[y : y + h, x : x + w] = 0
        if p.flip[i]:
            pixels = pixels[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
        return (tensor - PIXEL_MEAN) / PIXEL_STD


class PilRunner:
    def __init__(self, dataset_dir: Path, plan: Plan, workers: int) -> None:
        self.loader = torch.utils.data.DataLoader(
            PilDataset(dataset_dir, plan),
            batch_size=plan.batch,
            num_workers=workers,
            persistent_workers=True,
            prefetch_factor=2,
        )

    def run_round(self) -> int:
        return sum(batch.shape[0] for batch in self.loader)


# ----------------------------------------------------------------------------- main


def measure(
    runners: dict, rounds: int, cpu_us: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Images/s of each runner per round; with `cpu_us`, also this process's CPU µs per image."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for name, runner in runners.items():  # warm-up: pipelines built, workers started, pages cached
        runner.run_round()
        log.info("warmed up %s", name)
    for r in range(rounds):
        for name, runner in runners.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            count = runner.run_round()
            rates[name].append(count / (time.perf_counter() - started))
            if cpu_us is not None:
                cpu_us.setdefault(name, []).append((time.process_time() - cpu_started) / count * 1e6)
        log.info("round %d: %s", r + 1, {name: round(v[-1]) for name, v in rates.items()})
    return rates


PROFILE_CONFIGS = {
    "none": AugmentConfig(p_rescale=0.0, p_erase=0.0, p_color=0.0),
    "rescale": AugmentConfig(p_rescale=1.0, p_erase=0.0, p_color=0.0),
    "erase": AugmentConfig(p_rescale=0.0, p_erase=1.0, p_color=0.0),
    "color": AugmentConfig(p_rescale=0.0, p_erase=0.0, p_color=1.0),
    "default": AugmentConfig(),
}


def profile(store: ImageStore, args: argparse.Namespace) -> dict:
    """Cost of each degradation at p = 1 over the graph with every flag off, µs per image."""
    base_plan = Plan(store, args.images, args.batch, AugmentConfig())
    runners = {
        "decode_only": dali_runner("decode_only", store, base_plan, args.threads, None),
        "decode_normalise": dali_runner("decode_normalise", store, base_plan, args.threads, None),
    }
    for name, augment in PROFILE_CONFIGS.items():
        plan = Plan(store, args.images, args.batch, augment)
        runners[f"graph_{name}"] = dali_runner("regression", store, plan, args.threads, None)
    cpu: dict[str, list[float]] = {}
    rates = measure(runners, args.rounds, cpu)
    wall_us = {name: 1e6 / max(v) for name, v in rates.items()}
    cpu_us = {name: float(np.median(v)) for name, v in cpu.items()}

    def over_none(table: dict[str, float]) -> dict[str, float]:
        return {k: round(table[f"graph_{k}"] - table["graph_none"], 1) for k in ("rescale", "erase", "color")}

    return {
        "benchmark": "dali_pipeline_profile",
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "wall_us_per_image": {k: round(v, 1) for k, v in wall_us.items()},
        "cpu_us_per_image": {k: round(v, 1) for k, v in cpu_us.items()},
        "degradation_at_p1_wall_us": over_none(wall_us),
        "degradation_at_p1_cpu_us": over_none(cpu_us),
    }


def gpu_rates_of(store: ImageStore, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the GPU graph (decoder "mixed", GPU operators) and of GPU decode alone, on GPU 0."""
    runners = {
        "gpu_regression": dali_runner("regression", store, plan, args.threads, 0),
        "gpu_decode_only": dali_runner("decode_only", store, plan, args.threads, 0),
    }
    rates = measure(runners, args.rounds)
    best = {name: max(v) for name, v in rates.items()}
    return {
        "device": torch.cuda.get_device_name(0),
        "gpu_images_per_s": {name: round(v) for name, v in best.items()},
        "gpu_ratio_vs_decode_only": round(best["gpu_regression"] / best["gpu_decode_only"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="a converted dataset (default: synthesise one)"
    )
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--images", type=int, default=4096, help="images per round (default 4096)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=DataConfig().num_threads, help="DALI threads = PIL workers"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cost of each degradation at p = 1 instead of the ratios"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the CPU ratios (and the GPU rates when CUDA is there); gpu: the GPU rates only",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the main process only collects batches; the work is in DALI threads / workers
    if args.device == "gpu" and not args.profile and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "dali_pipeline", "gpu": "no CUDA device on this machine"}))
        return 0  # said before a data set is built for nothing

    with tempfile.TemporaryDirectory(prefix="bench_dali_") as scratch:
        dataset = args.dataset or build_dataset(Path(scratch))
        store = ImageStore(dataset)
        log.info("dataset %s: %d images, mean JPEG %.1f kB", dataset, len(store), store.nbytes.mean() / 1e3)
        if args.profile:
            print(json.dumps(profile(store, args)))
            return 0
        plan = Plan(store, args.images, args.batch, AugmentConfig())
        if args.device == "gpu":
            print(json.dumps({"benchmark": "dali_pipeline", **gpu_rates_of(store, plan, args)}))
            return 0
        runners = {
            "dali_regression": dali_runner("regression", store, plan, args.threads, None),
            "dali_decode_only": dali_runner("decode_only", store, plan, args.threads, None),
            "dali_decode_normalise": dali_runner("decode_normalise", store, plan, args.threads, None),
            "pil_dataloader": PilRunner(dataset, plan, args.threads),
        }
        cpu: dict[str, list[float]] = {}
        rates = measure(runners, args.rounds, cpu)
        gpu = gpu_rates_of(store, plan, args) if torch.cuda.is_available() else None
        best = {name: max(v) for name, v in rates.items()}
        result = {
            "benchmark": "dali_pipeline",
            "device": "cpu",
            "threads": args.threads,
            "batch": args.batch,
            "images_per_round": plan.batches * plan.batch,
            "rounds": args.rounds,
            "mean_jpeg_bytes": round(float(store.nbytes.mean())),
            "images_per_s": {name: round(v) for name, v in best.items()},
            "images_per_s_median": {name: round(float(np.median(v))) for name, v in rates.items()},
            "ratio_vs_pil": round(best["dali_regression"] / best["pil_dataloader"], 3),
            "ratio_vs_decode_only": round(best["dali_regression"] / best["dali_decode_only"], 3),
            "ratio_vs_decode_normalise": round(best["dali_regression"] / best["dali_decode_normalise"], 3),
            # steadier on a shared machine: the ratio within each round (variants run back to
            # back), and this process's CPU time per image (DALI threads + iterator; the PIL
            # workers are other processes, so PIL is left out)
            "ratio_vs_decode_only_paired_median": round(
                float(np.median(np.divide(rates["dali_regression"], rates["dali_decode_only"]))), 3
            ),
            "cpu_us_per_image": {
                name: round(float(np.median(v)), 1) for name, v in cpu.items() if name.startswith("dali")
            },
            "ratio_vs_decode_only_cpu": round(
                float(np.median(cpu["dali_decode_only"]) / np.median(cpu["dali_regression"])), 3
            ),
            "gpu_images_per_s": gpu,
        }
        del runners
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
