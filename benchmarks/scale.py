"""How the data stages scale: MS1M-V2-shaped sources at 100k / 300k / 1M records (5.8M with --full).

Each size gets an InsightFace-layout RecordIO source (`train.rec`, `train.idx`, `property`:
record 0 the header, one record per image, one identity record per class) shaped like MS1M-V2:
85,742 classes at its 5,822,653 images, scaled with the record count (1,473 classes at 100k),
with a long-tailed (lognormal) number of images per class. The images are TINY: a few dozen
distinct 112x112 grey JPEGs of about 0.9 kB each, reused (MS1M-V2's are ~10x larger), so the
times measure the stages' bookkeeping and per-image work, not disk bandwidth at real sizes.

Stages, each run in a fresh process (`python benchmarks/scale.py --child ...`) that imports
what it needs first and then times only the stage itself:

    inspect_source  igfiqa prep inspect SOURCE               (RecordIO: every record checked)
    convert         igfiqa prep convert SOURCE --out TRAIN   (--workers 1, 5,000 images per shard)
    inspect         igfiqa prep inspect TRAIN
    inspect_verify  igfiqa prep inspect TRAIN --verify
    curate_filter   igfiqa curate filter TRAIN --quality Q --rule lowest:20% --min-per-identity 2
                    (--no-report; Q is a synthetic quality file: seeded normal scores)
    train_start_w1  the training loader of one rank of 1 (W = 1): open the dataset (every manifest
                    row checked), draw the epoch's plan, hold the rank's rows, the first step's
                    batch through DALI (128 FR + 128 regression images, 2 threads)
    train_start_w8  the same for rank 0 of 8 (W = 8; 16 + 16 images): its peak anonymous memory
                    minus the imports' is the manifest memory one rank adds at this size
    erc             igfiqa erc on 10^6 and 10^7 synthetic pairs (5 % mated, 10 pairs per image);
                    also the sizes of the results.json and curves.csv it wrote

Per stage and size: `seconds` (the stage, timed inside its process), `peak_rss_mb` (the
process's peak resident set from wait4: includes the pages of memory-mapped files it read),
`peak_anon_mb` (its peak anonymous memory, sampled every 20 ms: what it allocated) and
`base_anon_mb` (the same after the imports, before the stage). Per stage: `exponent` =
log(t_largest / t_smallest) / log(size_largest / size_smallest), 1 = linear (between 100k
and 1M records by default; between 10^6 and 10^7 pairs for erc).

Other stages plug in through `STAGES` (`Stage`: a name, the axis it scales along with its
sizes, and a function returning what its child process runs): training start-up + one step
is added there. The classifier stages (axis "classes": C = 85,742 / 360,232 / 2,000,000,
MS1M-V2's, Glint360K's and WebFace42M's identities) time the objective's step of
benchmarks/partial_fc.py (classifier with the margin, CR statistics, variance table,
backward, SGD) on random embeddings, 128 + 128 per step, CPU, 2 threads:

    classifier_d128_rate1     sample_rate 1.0 (the full classifier), D = 128
    classifier_d128_rate0.1   Partial FC, sample_rate 0.1, exact NNCCS (the default), D = 128
    classifier_d128_rate0.1_sampled   the same with NNCCS over the step's sample only
    classifier_d512_rate0.1   the same at D = 512, C = 2M only (the issue's target)
    classifier_d512_rate1     sample_rate 1.0 at D = 512, C = 2M only (may not fit)
    classifier_d128_side_by_side   rate 1, 0.1 exact and 0.1 sampled at D = 128 in ONE process,
                              alternating step by step (`step_time` of partial_fc.py), so a
                              shared machine's load reaches them alike: `median_s`,
                              `speedup_vs_rate_1`, `step_s`; its `seconds` is the whole run

Their `seconds` is the median seconds PER STEP (after one warm-up step; 5 steps, 3 at 2M),
`step_s` the steps. Each child caps its address space (as `ulimit -v`) at what it has after
the imports plus the memory available when it starts, less 2 GiB: a mode that needs more
reports `fit: false` and the allocation that failed instead of driving the machine into
the OOM killer. Per C the run also prints the ratios rate 1 / rate 0.1 (exact and sampled
NNCCS) at D = 128.

`--code DIR` runs the stages with another checkout's code (e.g. `git archive` of an older
commit) while the sources, kept under --work, are reused: before/after figures from one script.
Logs go to stderr; the last stdout line is one JSON object.

    .venv/bin/python benchmarks/scale.py [--sizes 100000 300000 1000000] [--full] [--work DIR]
        [--stages convert curate_filter ...] [--code DIR]
    .venv/bin/python benchmarks/scale.py --stages classifier_d128_rate1 classifier_d128_rate0.1 \
        --class-sizes 85742 360232
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # its sibling, also when imported as benchmarks.scale

from scale_classifier import CLASS_SIZES, available_gib, classifier_ratios

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.scale")

MS1M_IMAGES = 5_822_653
MS1M_CLASSES = 85_742
DEFAULT_SIZES = (100_000, 300_000, 1_000_000)
PAIR_SIZES = (1_000_000, 10_000_000)
DISTINCT_IMAGES = 48
SAMPLE_INTERVAL_S = 0.02


# ----------------------------------------------------------------------------- sources


def num_classes_for(records: int) -> int:
    """MS1M-V2's classes scaled with the record count (85,742 at 5,822,653)."""
    return max(1, round(MS1M_CLASSES * records / MS1M_IMAGES))


def class_sizes(records: int, classes: int, seed: int = 0) -> np.ndarray:
    """Long-tailed images per class (lognormal, at least 1 each) summing to `records` exactly."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=0.9, size=classes)
    extra = records - classes
    raw = weights / weights.sum() * extra
    sizes = np.floor(raw).astype(np.int64)
    short = extra - int(sizes.sum())
    sizes[np.argsort(raw - sizes)[::-1][:short]] += 1  # largest remainders
    return sizes + 1


def tiny_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct 112x112 grey JPEGs of well under a kilobyte."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.integers(40, 200)
        ramp = np.linspace(0, rng.integers(10, 50), 112)
        pixels = (base + ramp[None, :] + ramp[:, None] / 2).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(buffer, format="JPEG", quality=40)
        images.append(buffer.getvalue())
    return images


def build_source(folder: Path, records: int) -> dict[str, Any]:
    """An MS1M-V2-shaped InsightFace RecordIO source of `records` images in FOLDER (kept if complete)."""
    from data_prep.recordio import RecordIOWriter, pack_header

    stamp = folder / "built.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    classes = num_classes_for(records)
    sizes = class_sizes(records, classes)
    jpegs = tiny_jpegs(DISTINCT_IMAGES)
    first_identity = records + 1
    started = time.perf_counter()
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(0, pack_header([float(first_identity), float(first_identity + classes)]))
        key = 1
        for label, size in enumerate(sizes.tolist()):
            header = pack_header(float(label))
            for _ in range(size):
                writer.write(key, header + jpegs[key % DISTINCT_IMAGES])
                key += 1
        starts = np.cumsum(sizes) - sizes + 1
        for label in range(classes):
            start = int(starts[label])
            writer.write(first_identity + label, pack_header([float(start), float(start + sizes[label])]))
    (folder / "property").write_text(f"{classes},112,112\n")
    built = {
        "records": records,
        "classes": classes,
        "largest_class": int(sizes.max()),
        "mean_jpeg_bytes": round(float(np.mean([len(j) for j in jpegs])), 1),
        "rec_bytes": (folder / "train.rec").stat().st_size,
        "build_s": round(time.perf_counter() - started, 1),
    }
    stamp.write_text(json.dumps(built))
    return built


# ----------------------------------------------------------------------------- inputs made in children


def write_quality(dataset: str, out: str, seed: int = 7) -> None:
    """A quality file for DATASET (its fingerprint, seeded normal scores), as `curate score` writes one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.dataset import dataset_fingerprint
    from data_prep.quality_file import QualitySource, write_quality_file

    manifest = pq.read_table(Path(dataset) / "manifest.parquet", columns=["key", "record", "label"])
    quality = np.random.default_rng(seed).normal(size=manifest.num_rows).astype(np.float32)
    table = manifest.append_column("quality", pa.array(quality))
    source = QualitySource(
        dataset_fingerprint=dataset_fingerprint(Path(dataset)),
        model_fingerprint="benchmark",
        num_images=manifest.num_rows,
        checkpoint="benchmarks/scale.py",
    )
    write_quality_file(Path(out), table, source)


def write_pairs(folder: str, pairs: int, seed: int = 11) -> None:
    """FOLDER/pairs.parquet (left, right, similarity, mated: 5 % mated) and FOLDER/scores.parquet
    (image, quality) over pairs/10 images."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    images = max(100, pairs // 10)
    names = np.array([f"img/{i:08d}.jpg" for i in range(images)], dtype=object)
    mated = rng.random(pairs) < 0.05
    similarity = np.where(mated, rng.normal(0.6, 0.15, pairs), rng.normal(0.0, 0.1, pairs))
    table = pd.DataFrame(
        {
            "left": names[rng.integers(0, images, pairs)],
            "right": names[rng.integers(0, images, pairs)],
            "similarity": similarity,
            "mated": mated,
        }
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    table.to_parquet(Path(folder) / "pairs.parquet", index=False)
    pd.DataFrame({"image": names, "quality": rng.random(images)}).to_parquet(
        Path(folder) / "scores.parquet", index=False
    )


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class ChildSpec:
    """What a stage's fresh process runs: `igfiqa ARGV` (kind "cli") or `module:function(**kwargs)`
    (kind "call"); `preload` modules are imported before the clock starts."""

    kind: str
    argv: tuple[str, ...] = ()
    target: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    preload: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "argv": list(self.argv),
                "target": self.target,
                "kwargs": self.kwargs,
                "preload": list(self.preload),
            }
        )


@dataclass(frozen=True)
class Stage:
    """A benchmarked stage: `run(context, size)` prepares its inputs (untimed, in children when they
    need the code under test) and returns the ChildSpec to time. `axis` names what `size` counts:
    "records" (the data set sizes), or its own `sizes` (e.g. pairs, classes)."""

    name: str
    run: Callable[[Context, int], ChildSpec]
    axis: str = "records"
    sizes: tuple[int, ...] = ()
    extras: Callable[[Context, int], dict[str, Any]] | None = None  # more figures, read after the run


@dataclass
class Context:
    """Where one benchmark run keeps its sources and outputs, and which code its children import."""

    work: Path
    code: Path

    def size_dir(self, records: int) -> Path:
        return self.work / f"n{records}"

    def source(self, records: int) -> Path:
        path = self.size_dir(records) / "source"
        build_source(path, records)
        return path

    def converted(self, records: int) -> Path:
        """The converted dataset of this size (converted now, untimed, when an earlier stage did not)."""
        out = self.size_dir(records) / "train"
        if not (out / "dataset.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            run_child(self, _convert_spec(self, records), quiet=True)
        return out


DATA_PRELOAD = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "jobs.cli", "data_prep.inspect")


def _inspect_source(ctx: Context, records: int) -> ChildSpec:
    return ChildSpec("cli", ("prep", "inspect", str(ctx.source(records))), preload=DATA_PRELOAD)


def _convert_spec(ctx: Context, records: int) -> ChildSpec:
    out = ctx.size_dir(records) / "train"
    argv = ("prep", "convert", str(ctx.source(records)), "--out", str(out), "--no-track", "--workers", "1")
    return ChildSpec("cli", argv, preload=(*DATA_PRELOAD, "data_prep.convert"))


def _convert(ctx: Context, records: int) -> ChildSpec:
    shutil.rmtree(ctx.size_dir(records) / "train", ignore_errors=True)
    return _convert_spec(ctx, records)


def _inspect(ctx: Context, records: int) -> ChildSpec:
    return ChildSpec("cli", ("prep", "inspect", str(ctx.converted(records))), preload=DATA_PRELOAD)


def _inspect_verify(ctx: Context, records: int) -> ChildSpec:
    argv = ("prep", "inspect", str(ctx.converted(records)), "--verify")
    return ChildSpec("cli", argv, preload=DATA_PRELOAD)


def _curate_filter(ctx: Context, records: int) -> ChildSpec:
    train = ctx.converted(records)
    quality = ctx.size_dir(records) / "quality.parquet"
    run_child(
        ctx,
        ChildSpec(
            "call", target="__main__:write_quality", kwargs={"dataset": str(train), "out": str(quality)}
        ),
        quiet=True,
    )
    out = ctx.size_dir(records) / "curated"
    shutil.rmtree(out, ignore_errors=True)
    argv = (
        "curate", "filter", str(train), "--quality", str(quality), "--out", str(out),
        "--rule", "lowest:20%", "--min-per-identity", "2", "--no-track", "--no-report",
    )  # fmt: skip
    return ChildSpec("cli", argv, preload=(*DATA_PRELOAD, "data_prep.curate", "jobs.stages.curate"))


def train_start(dataset: str, world_size: int) -> None:
    """Rank 0 of `world_size`: the training loader's start-up and its first step's batch."""
    from data_prep.dataset import load_dataset_info
    from pipeline.config import BatchLayout, DataConfig
    from pipeline.data.loader import TrainLoader

    per_rank = 128 // world_size
    cfg = DataConfig(dataset=dataset, fr_batch=128, reg_batch=128, num_threads=2)
    loader = TrainLoader(cfg, BatchLayout.of(cfg, world_size, load_dataset_info(Path(dataset)).num_images, 0))
    loader.set_epoch(0)
    batch = next(iter(loader))
    if len(batch.fr) != per_rank or len(batch.reg) != per_rank:
        raise RuntimeError(f"rank 0 of {world_size} got {len(batch.fr)} + {len(batch.reg)} images")
    loader.close()


def _train_start(world_size: int) -> Callable[[Context, int], ChildSpec]:
    def spec(ctx: Context, records: int) -> ChildSpec:
        kwargs = {"dataset": str(ctx.converted(records)), "world_size": world_size}
        preload = ("numpy", "pyarrow.parquet", "torch", "nvidia.dali", "pipeline.data.loader")
        return ChildSpec("call", target="__main__:train_start", kwargs=kwargs, preload=preload)

    return spec


def _erc(ctx: Context, pairs: int) -> ChildSpec:
    folder = ctx.work / f"pairs{pairs}"
    if not (folder / "scores.parquet").is_file():
        run_child(
            ctx,
            ChildSpec("call", target="__main__:write_pairs", kwargs={"folder": str(folder), "pairs": pairs}),
            quiet=True,
        )
    out = folder / "erc"
    shutil.rmtree(out, ignore_errors=True)
    argv = (
        "erc",
        "--pairs",
        str(folder / "pairs.parquet"),
        "--scores",
        str(folder / "scores.parquet"),
        "--out",
        str(out),
    )
    return ChildSpec("cli", argv, preload=(*DATA_PRELOAD, "pipeline.evaluation.quality_metrics", "pipeline.evaluation.report", "jobs.evaluation"))  # fmt: skip


def _erc_outputs(ctx: Context, pairs: int) -> dict[str, Any]:
    out = ctx.work / f"pairs{pairs}" / "erc"
    return {
        f"{name.replace('.', '_')}_mb": round((out / name).stat().st_size / 1e6, 2)
        for name in ("results.json", "curves.csv")
    }


def _side_by_side(ctx: Context, classes: int) -> ChildSpec:
    kwargs = {
        "classes": classes,
        "steps": 5,
        "budget_gib": available_gib(),
    }
    return ChildSpec(
        "call", target="scale_classifier:classifier_side_by_side", kwargs=kwargs, preload=("torch",)
    )


def _classifier(dim: int, rate: float, nnccs: str = "exact") -> Callable[[Context, int], ChildSpec]:
    def spec(ctx: Context, classes: int) -> ChildSpec:
        budget = available_gib()
        kwargs = {
            "classes": classes,
            "dim": dim,
            "rate": rate,
            "nnccs": nnccs,
            "steps": 3 if classes >= 1_000_000 else 5,
            "budget_gib": budget,
        }
        return ChildSpec(
            "call", target="scale_classifier:classifier_steps", kwargs=kwargs, preload=("torch",)
        )

    return spec


STAGES: list[Stage] = [
    Stage("inspect_source", _inspect_source),
    Stage("convert", _convert),
    Stage("inspect", _inspect),
    Stage("inspect_verify", _inspect_verify),
    Stage("curate_filter", _curate_filter),
    Stage("train_start_w1", _train_start(1)),
    Stage("train_start_w8", _train_start(8)),
    Stage("erc", _erc, axis="pairs", sizes=PAIR_SIZES, extras=_erc_outputs),
    Stage("classifier_d128_rate1", _classifier(128, 1.0), axis="classes", sizes=CLASS_SIZES),
    Stage("classifier_d128_rate0.1", _classifier(128, 0.1), axis="classes", sizes=CLASS_SIZES),
    Stage(
        "classifier_d128_rate0.1_sampled", _classifier(128, 0.1, "sampled"), axis="classes", sizes=CLASS_SIZES
    ),
    Stage("classifier_d512_rate0.1", _classifier(512, 0.1), axis="classes", sizes=CLASS_SIZES[-1:]),
    Stage("classifier_d512_rate1", _classifier(512, 1.0), axis="classes", sizes=CLASS_SIZES[-1:]),
    Stage("classifier_d128_side_by_side", _side_by_side, axis="classes", sizes=CLASS_SIZES),
]


# ----------------------------------------------------------------------------- processes


def _anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(ctx: Context, spec: ChildSpec, *, quiet: bool = False) -> dict[str, Any]:
    """Run `spec` in a fresh process with ctx.code's code: its own timing, peak RSS and peak anonymous memory."""
    report = ctx.work / f".child-{os.getpid()}.json"
    report.unlink(missing_ok=True)
    env = dict(
        os.environ, PYTHONPATH=str(ctx.code), MLFLOW_TRACKING_URI=f"sqlite:///{ctx.work / 'mlflow.db'}"
    )
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        spec.to_json(),
        "--report",
        str(report),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=ctx.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if quiet else None
    )
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            kb = _anon_kb(process.pid)
            if kb is not None:
                peak_anon[0] = max(peak_anon[0], kb)
            done.wait(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = process.stderr.read() if process.stderr is not None else b""
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"child failed ({process.returncode}): {spec.to_json()}\n{stderr.decode(errors='replace')[-3000:]}"
        )
    result = json.loads(report.read_text())
    report.unlink()
    figures = result.get("figures", {})
    seconds = figures.pop("seconds", result["seconds"])  # a call's own measure (e.g. per step) wins
    return {
        "seconds": None if seconds is None else round(seconds, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_anon_mb": round(peak_anon[0] / 1024, 1),
        "base_anon_mb": round(result["base_anon_kb"] / 1024, 1),
        **figures,
    }


def child_main(spec_json: str, report: Path) -> None:
    """In the fresh process: import, then time the stage; write {"seconds", "base_anon_kb"} to REPORT,
    and "figures", the dict a "call" returned (its "seconds", if any, is the stage's measure)."""
    spec = json.loads(spec_json)
    for module in spec["preload"]:
        importlib.import_module(module)
    base = _anon_kb(os.getpid()) or 0
    figures = None
    if spec["kind"] == "cli":
        from jobs.cli import main

        started = time.perf_counter()
        status = main(spec["argv"])
        seconds = time.perf_counter() - started
        if status not in (0, None):
            raise SystemExit(f"igfiqa {' '.join(spec['argv'])} exited with {status}")
    else:
        module, name = spec["target"].split(":")
        function = getattr(
            sys.modules["__main__"] if module == "__main__" else importlib.import_module(module), name
        )
        started = time.perf_counter()
        figures = function(**spec["kwargs"])
        seconds = time.perf_counter() - started
    out = {"seconds": seconds, "base_anon_kb": base}
    report.write_text(json.dumps(out | ({"figures": figures} if isinstance(figures, dict) else {})))


# ----------------------------------------------------------------------------- the run


def exponent(times: dict[int, float]) -> float | None:
    """Growth exponent between the smallest and the largest size: log(t ratio) / log(size ratio)."""
    times = {size: t for size, t in times.items() if t is not None}
    if len(times) < 2:
        return None
    low, high = min(times), max(times)
    if times[low] <= 0:
        return None
    return round(math.log(times[high] / times[low]) / math.log(high / low), 3)


def git_revision(code: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True
        )
        return result.stdout.strip()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="records per source"
    )
    parser.add_argument("--full", action="store_true", help=f"also MS1M-V2's size ({MS1M_IMAGES:,} records)")
    parser.add_argument("--pair-sizes", type=int, nargs="+", default=list(PAIR_SIZES), help="pairs for erc")
    parser.add_argument(
        "--class-sizes",
        type=int,
        nargs="+",
        default=list(CLASS_SIZES),
        help="run the classifier stages at these of their C (default: all of %(default)s)",
    )
    parser.add_argument(
        "--stages", nargs="+", default=None, help=f"of {[s.name for s in STAGES]} (default: all)"
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "work" / "bench-scale", help="sources and outputs"
    )
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose code the stages run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.report)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sizes = sorted(set(args.sizes) | ({MS1M_IMAGES} if args.full else set()))
    stages = [s for s in STAGES if args.stages is None or s.name in args.stages]
    unknown = set(args.stages or ()) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    ctx = Context(work=args.work.resolve(), code=args.code.resolve())
    ctx.work.mkdir(parents=True, exist_ok=True)
    sources = {}
    for records in sizes:
        if any(s.axis == "records" for s in stages):
            sources[records] = build_source(ctx.size_dir(records) / "source", records)
            log.info("source %d records: %s", records, sources[records])
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for records in sizes:  # by size, so each size's outputs feed its later stages
        for stage in stages:
            if stage.axis == "records":
                results.setdefault(stage.name, {})[str(records)] = _measure(ctx, stage, records)
    others = [s for s in stages if s.axis != "records"]
    axis_sizes = {s.name: _stage_sizes(s, args) for s in others}
    for size in sorted({size for s in others for size in axis_sizes[s.name]}):  # a size's stages side by side
        for stage in others:
            if size in axis_sizes[stage.name]:
                results.setdefault(stage.name, {})[str(size)] = _measure(ctx, stage, size)
    exponents = {
        name: exponent({int(k): v["seconds"] for k, v in by_size.items()})
        for name, by_size in results.items()
    }
    ratios = classifier_ratios(results)
    log.info("\n%-23s %12s %10s %12s %12s", "stage", "size", "seconds", "peak RSS MB", "peak anon MB")
    for name, by_size in results.items():
        for size, r in by_size.items():
            log.info(
                "%-23s %12s %10s %12.0f %12.0f",
                name,
                size,
                "did not fit" if r["seconds"] is None else f"{r['seconds']:.2f}",
                r["peak_rss_mb"],
                r["peak_anon_mb"],
            )
        log.info("%-23s exponent %s", name, exponents[name])
    if ratios:
        log.info("classifier step seconds, rate 1 / Partial FC (D = 128): %s", ratios)
    print(
        json.dumps(
            {
                "bench": "scale",
                "cores": os.cpu_count(),
                "sizes": sizes,
                "sources": {str(k): v for k, v in sources.items()},
                "results": results,
                "exponents": exponents,
                "classifier_rate1_over_rate0.1": ratios,
                "code": str(ctx.code),
                "git": git_revision(ctx.code),
            }
        )
    )


def _stage_sizes(stage: Stage, args: argparse.Namespace) -> list[int]:
    """The sizes a stage off the "records" axis runs at: --pair-sizes, or its own (within --class-sizes)."""
    if stage.axis == "pairs":
        return list(args.pair_sizes)
    if stage.axis == "classes":
        return [n for n in stage.sizes if n in args.class_sizes]
    return list(stage.sizes)


def _measure(ctx: Context, stage: Stage, size: int) -> dict[str, Any]:
    spec = stage.run(ctx, size)
    result = run_child(ctx, spec)
    if stage.extras is not None:
        result |= stage.extras(ctx, size)
    log.info(
        "%s at %d: %s s, peak RSS %.0f MB, peak anon %.0f MB",
        stage.name,
        size,
        result["seconds"],
        result["peak_rss_mb"],
        result["peak_anon_mb"],
    )
    return result


if __name__ == "__main__":
    main()
