"""Benchmark `prep convert` against a plain byte copy of the same `.rec`.

Two synthetic InsightFace datasets, built once and cached under `--cache`: a few hundred MB of
large JPEGs (data_prep.synth_faces faces, upscaled and noised), where a conversion is about
bytes, and real-sized 112×112 faces, where per-record overhead dominates. With the page cache
warm, copies (`shutil.copyfile`) and 1- and 2-worker conversions alternate. Every timed run
starts after `os.sync()`, and each ratio uses the copies timed beside its own contender:
background writeback slows copies timed anywhere else. A worker is a process that also runs
threads (hashing beside validation, two shards in flight), so one worker may keep two cores busy.

Logs go to stderr; the last stdout line is one JSON object:
- ratio_vs_copy: conversion throughput (source bytes/s, 1 worker) ÷ copy throughput;
  ratio_vs_copy_paired_median: the median over (copy, conversion) pairs; cpu_s: user + system.
- floor_s: the least work any conversion must do (`floor_once`); ratio_vs_copy_at_floor: the best
  ratio a conversion can reach on this machine; the legs' single-core speeds beside it.
- image_checks: 1-worker conversions at each image check level ("magic": the magic bytes only,
  "structure": the default, "decode": `--verify-decode`) and what the check costs per image
  (`image_check_costs`). `--image-checks-only` runs just that part.

    .venv/bin/python benchmarks/convert.py [--mb 300] [--repeats 3] [--image-checks-only]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import mmap
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import xxhash
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.convert import convert
from data_prep.synth import synthesize, write_insightface_recordio
from data_prep.synth_faces import draw_traits, draw_variation, render_face

log = logging.getLogger("bench.convert")

# 200 large images (~122 kB) per shard = ~24 MB shards: the byte size of a default 5000-sample
# shard of real 112×112 face crops (~5 kB each), so per-shard costs weigh as they do in use
BIG_SAMPLES_PER_SHARD = 200


def big_face_jpegs(count: int, seed: int) -> list[bytes]:
    """Large (448×448, noisy, q95) face JPEGs: ~0.3 MB each."""
    rng = np.random.default_rng(seed)
    traits = draw_traits(rng)
    images = []
    for _ in range(count):
        face = Image.fromarray(render_face(traits, draw_variation(rng))).resize((448, 448), Image.BICUBIC)
        noisy = np.asarray(face, dtype=np.float32) + rng.normal(0, 14, (448, 448, 3)).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        images.append(buffer.getvalue())
    return images


def build_big_source(folder: Path, target_mb: int) -> Path:
    """A cached InsightFace dataset of about `target_mb` MB of large images (100 identities)."""
    stamp = folder / "built.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("target_mb") == target_mb:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sample = big_face_jpegs(8, seed=0)
    per_image = sum(map(len, sample)) / len(sample)
    identities = 100
    per_identity = max(1, round(target_mb * 1e6 / per_image / identities))
    log.info(
        "building a %d MB source: %d identities × %d images of ~%.0f kB",
        target_mb,
        identities,
        per_identity,
        per_image / 1e3,
    )
    started = time.perf_counter()
    classes = [big_face_jpegs(per_identity, seed=1 + c) for c in range(identities)]
    write_insightface_recordio(folder, classes, image_size=448)
    stamp.write_text(json.dumps({"target_mb": target_mb}))
    log.info("built in %.1f s", time.perf_counter() - started)
    return folder


def build_small_source(folder: Path, repeats: int) -> Path:
    """Real-sized 112×112 synthetic images (the demo's), each identity's images repeated `repeats` times."""
    stamp = folder / "built.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("repeats") == repeats:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    synth = folder / "synth"
    synthesize(synth, identities=200, images_per_identity=12, verification_pairs=2, seed=0)
    from data_prep.recordio import RecordIOReader, unpack_header
    from data_prep.source import read_source

    source = read_source(synth)
    classes: list[list[bytes]] = [[] for _ in range(source.num_classes)]
    with RecordIOReader(source.files.rec) as reader:
        for record, offset, label in zip(source.records, source.offsets, source.labels):
            payload = reader.read_at(int(offset), int(record))
            classes[label].append(payload[unpack_header(payload)[1] :])
    write_insightface_recordio(folder, [images * repeats for images in classes], image_size=112)
    shutil.rmtree(synth)
    stamp.write_text(json.dumps({"repeats": repeats}))
    return folder


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def settle() -> None:
    """Write back earlier runs' dirty pages now, so that it does not happen during a timing."""
    os.sync()


def time_copy(rec: Path, scratch: Path) -> float:
    target = scratch / "copy.rec"
    settle()
    started = time.perf_counter()
    shutil.copyfile(rec, target)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


CPU_SECONDS: dict[int, list[float]] = {}


def time_convert(
    source: Path, scratch: Path, *, workers: int, samples_per_shard: int, image_check: str = "structure"
) -> float:
    out = scratch / f"out-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    settle()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    convert(
        source,
        out,
        samples_per_shard=samples_per_shard,
        workers=workers,
        seed=0,
        progress=False,
        image_check=image_check,
    )
    elapsed = time.perf_counter() - started
    CPU_SECONDS.setdefault(workers, []).append(cpu_seconds() - cpu_before)
    shutil.rmtree(out)
    return elapsed


def image_views(source: Path, view: memoryview) -> list[memoryview]:
    """Zero-copy slices of every image in the memory-mapped `.rec` (file order)."""
    from data_prep.source import read_source

    dataset = read_source(source)
    return [view[o : o + n] for o, n in zip(dataset.image_offsets.tolist(), dataset.image_nbytes.tolist())]


def leg_seconds(images: list[memoryview], scratch: Path) -> dict[str, float]:
    """Seconds one core takes to SHA-256 every image, XXH3-128 them and write them (best of 3)."""
    target = scratch / "leg.bin"

    def write() -> None:
        write_views(images, target)
        target.unlink()

    legs = {
        "sha256": lambda: [hashlib.sha256(image).digest() for image in images],
        "xxh128": lambda: xxh128(images),
    }
    legs["write"] = write
    best = {}
    for name, leg in legs.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            leg()
            times.append(time.perf_counter() - started)
        best[name] = min(times)
    return best


def xxh128(images: list[memoryview]) -> bytes:
    """XXH3-128 of the images' bytes one after the other (as of the file holding them)."""
    digest = xxhash.xxh3_128()
    for image in images:
        digest.update(image)
    return digest.digest()


def write_views(images: list[memoryview], target: Path) -> None:
    """Write the buffers one after the other into a new file (writev, as the conversion does)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(images), 1024):
            os.writev(fd, images[start : start + 1024])
    finally:
        os.close(fd)


def floor_once(images: list[memoryview], scratch: Path, threads: int) -> float:
    """Wall seconds of the bare minimum, every core busy: SHA-256 of each image (chunks
    shared by all threads), XXH3-128 of the source and of the output, one write."""
    chunks = queue.SimpleQueue()
    for start in range(0, len(images), 64):
        chunks.put(images[start : start + 64])

    def hash_chunks() -> None:
        while True:
            try:
                chunk = chunks.get_nowait()
            except queue.Empty:
                return
            for image in chunk:
                hashlib.sha256(image).digest()

    target = scratch / "floor.bin"
    settle()
    started = time.perf_counter()
    helpers = [threading.Thread(target=hash_chunks) for _ in range(threads - 1)]
    for helper in helpers:
        helper.start()
    for _ in range(2):  # the source's checksum, then the output's (over the same bytes)
        xxh128(images)
    write_views(images, target)
    hash_chunks()  # then help with the hashing
    for helper in helpers:
        helper.join()
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


IMAGE_CHECK_LEVELS = ("magic", "structure", "decode")


def image_check_costs(
    source: Path, scratch: Path, *, samples_per_shard: int, repeats: int
) -> dict[str, float]:
    """1-worker conversions at each image check level, and the validation pass alone.

    Conversions: medians and minimums (a loaded machine adds noise, never speed) of wall
    seconds, and `*_ratio` = median over repeats of that level's time ÷ "magic"'s in the same
    repeat. The validation pass alone (`read_source`, where the checks run) is timed in CPU
    seconds, best of the repeats: `check_us_per_image` is what "structure" adds to it per
    image, `check_share_of_conversion` that cost ÷ the fastest "magic" conversion.
    """
    from data_prep.source import read_source

    warm(source / "train.rec")
    seconds: dict[str, list[float]] = {level: [] for level in IMAGE_CHECK_LEVELS}
    validation: dict[str, list[float]] = {level: [] for level in ("magic", "structure")}
    for repeat in range(repeats):
        for level in IMAGE_CHECK_LEVELS:
            seconds[level].append(
                time_convert(
                    source, scratch, workers=1, samples_per_shard=samples_per_shard, image_check=level
                )
            )
        for level in validation:
            started = time.process_time()
            images = read_source(source, image_check=level).num_images
            validation[level].append(time.process_time() - started)
        log.info("image checks, run %d: %s", repeat, {k: round(v[-1], 3) for k, v in seconds.items()})
    result: dict[str, float] = {"images": images}
    for level, times in seconds.items():
        result[f"{level}_s"] = round(statistics.median(times), 3)
        result[f"{level}_min_s"] = round(min(times), 3)
    for level in ("structure", "decode"):
        ratios = [t / base for t, base in zip(seconds[level], seconds["magic"])]
        result[f"{level}_ratio"] = round(statistics.median(ratios), 3)
        result[f"{level}_ratio_of_minimums"] = round(min(seconds[level]) / min(seconds["magic"]), 3)
    check_s = min(validation["structure"]) - min(validation["magic"])
    result["validation_magic_cpu_s"] = round(min(validation["magic"]), 3)
    result["validation_structure_cpu_s"] = round(min(validation["structure"]), 3)
    result["check_us_per_image"] = round(check_s / images * 1e6, 2)
    result["check_share_of_conversion"] = round(check_s / min(seconds["magic"]), 3)
    return result


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=300, help="size of the large-image source (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each contender (default 3)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "igfiqa-bench-convert")
    parser.add_argument(
        "--image-checks-only", action="store_true", help="time only the image check levels (see above)"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )

    big = build_big_source(args.cache / "big", args.mb)
    small = build_small_source(args.cache / "small", repeats=8)
    scratch = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.cache))
    try:
        image_checks = {
            "large_jpegs": image_check_costs(
                big, scratch, samples_per_shard=BIG_SAMPLES_PER_SHARD, repeats=args.repeats
            ),
            "small_112px": image_check_costs(small, scratch, samples_per_shard=5000, repeats=args.repeats),
        }
        if args.image_checks_only:
            print(
                json.dumps(
                    {
                        "bench": "convert.image_checks",
                        "cpus": os.cpu_count(),
                        **image_checks,
                        "git": git_revision(),
                    }
                )
            )
            return

        rec = big / "train.rec"
        size_mb = rec.stat().st_size / 1e6
        warm(rec)
        warm(big / "train.idx")
        time_copy(rec, scratch)  # warm-up of both paths
        time_convert(big, scratch, workers=1, samples_per_shard=BIG_SAMPLES_PER_SHARD)
        copies, singles, doubles = [], [], []
        for repeat in range(args.repeats):
            copies.append(time_copy(rec, scratch))
            singles.append(time_convert(big, scratch, workers=1, samples_per_shard=BIG_SAMPLES_PER_SHARD))
            doubles.append(time_convert(big, scratch, workers=2, samples_per_shard=BIG_SAMPLES_PER_SHARD))
            log.info(
                "run %d: copy %.3f s, convert 1 worker %.3f s, 2 workers %.3f s",
                repeat,
                copies[-1],
                singles[-1],
                doubles[-1],
            )
        one_s, two_s = (statistics.median(x) for x in (singles, doubles))
        one_cpu_s, two_cpu_s = (statistics.median(CPU_SECONDS[w][-args.repeats :]) for w in (1, 2))
        with open(rec, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            images = image_views(big, view)
            legs = leg_seconds(images, scratch)
            floors, floor_copies = [], []
            for _ in range(args.repeats):
                floors.append(floor_once(images, scratch, threads=os.cpu_count() or 1))
                floor_copies.append(time_copy(rec, scratch))
            floor_s = statistics.median(floors)
            del images, view
        copy_s = statistics.median(copies)
        paired_ratio = statistics.median(copy / single for copy, single in zip(copies, singles))
        floor_copy_s = statistics.median(floor_copies)

        small_rec = small / "train.rec"
        warm(small_rec)
        small_images = int((small / "train.idx").read_text().count("\n")) - 1 - 200
        small_copy = statistics.median(time_copy(small_rec, scratch) for _ in range(args.repeats))
        small_one = statistics.median(
            time_convert(small, scratch, workers=1, samples_per_shard=5000) for _ in range(args.repeats)
        )
        small_two = statistics.median(
            time_convert(small, scratch, workers=2, samples_per_shard=5000) for _ in range(args.repeats)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "bench": "convert",
        "source_mb": round(size_mb, 1),
        "images": int((big / "train.idx").read_text().count("\n")) - 1 - 100,
        "cpus": os.cpu_count(),
        "copy_s": round(copy_s, 3),
        "copy_mb_per_s": round(size_mb / copy_s, 1),
        "convert_s": round(one_s, 3),
        "convert_mb_per_s": round(size_mb / one_s, 1),
        "ratio_vs_copy": round(copy_s / one_s, 3),
        "ratio_vs_copy_paired_median": round(paired_ratio, 3),
        "sha256_mb_per_s": round(size_mb / legs["sha256"], 1),
        "xxh128_mb_per_s": round(size_mb / legs["xxh128"], 1),
        "write_mb_per_s": round(size_mb / legs["write"], 1),
        "floor_s": round(floor_s, 3),
        "floor_copy_s": round(floor_copy_s, 3),
        "ratio_vs_copy_at_floor": round(floor_copy_s / floor_s, 3),
        "workers": {
            "1": {"s": round(one_s, 3), "mb_per_s": round(size_mb / one_s, 1), "cpu_s": round(one_cpu_s, 3)},
            "2": {"s": round(two_s, 3), "mb_per_s": round(size_mb / two_s, 1), "cpu_s": round(two_cpu_s, 3)},
        },
        "speedup_2_workers": round(one_s / two_s, 2),
        "small_112px": {
            "images": small_images,
            "source_mb": round(small_rec.stat().st_size / 1e6, 1),
            "img_per_s_1_worker": round(small_images / small_one),
            "img_per_s_2_workers": round(small_images / small_two),
            "ratio_vs_copy": round(small_copy / small_one, 3),
        },
        "image_checks": image_checks,
        "git": git_revision(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
