"""`igfiqa prep synth`: the embedded synthetic face dataset, with known quality ground truth.

It is written in exactly the formats real data comes in (InsightFace `train.rec`/
`train.idx`/`property`, verification `.bin` pickles), so it travels the same path.

The faces come from `data_prep.synth_faces` (the renderer: identity traits, per-image variation,
graded degradations); this module draws who gets which images and degradations and writes them.
A fraction of identities has low intra-class variance: every image is a near-duplicate
of one rendering, and most of them carry the same degradation (the paper's failure case:
such classes look easy, so CR-FIQA overrates their bad images).

Ground truth goes to `ground_truth.parquet` (record, identity, image, degradation,
strength, low_variance) and `<set>_ground_truth.parquet` per verification set
(`clean`: undegraded; `mixed`: the same renderings, most of them degraded).
Everything is a pure function of the seed.

`synthesize_identity_set` writes an identity-labelled evaluation set instead: N identities ×
K images as an image folder (`OUT/<identity>/<n>.jpg`, what `igfiqa prep convert` reads like
any user's folder) with `ground_truth.parquet` (path, identity, image, degradation, strength).
Its identities are the seed's evaluation identities (those of its verification sets, never a
training identity of any seed); its images are degraded as the mixed verification set's.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.atomic import atomic_write, atomic_write_bytes, atomic_write_json
from data_prep.errors import DataError
from data_prep.manifest import write_table
from data_prep.recordio import RecordIOWriter, pack_header
from data_prep.synth_faces import (
    DEGRADATIONS,
    NO_DEGRADATION,
    degrade,
    draw_traits,
    draw_variation,
    encode_jpeg,
    render_face,
)

log = logging.getLogger(__name__)

VERIFICATION_SETS = ("clean", "mixed")
# In the mixed verification set a minority of images is degraded, as in unconstrained benchmarks:
# then the pairs that fail are a minority too, and discarding the lowest-quality fifth of the pairs
# (the EDC's operating range) can remove most failures when quality is right.
MIXED_DEGRADED_FRACTION = 0.25
# stream ids in the seed sequence, so training and verification identities never share a stream
_TRAIN_STREAM, _VERIFICATION_STREAM, _PAIRS_STREAM, _IDENTITY_SET_STREAM = 0, 1, 2, 3
IDENTITY_SET_KIND = "identity-set"  # synth.json's `kind` of an identity-labelled set


@dataclass(frozen=True)
class SynthSettings:
    """What `synthesize` draws; stored in OUT/synth.json."""

    identities: int = 200
    images_per_identity: int = 12  # mean; each identity gets 0.7×–1.3× this
    low_variance_fraction: float = 0.15
    clean_fraction: float = 0.5  # of images in ordinary identities
    verification_identities: int = 60  # disjoint from training
    verification_pairs: int = 300  # per set, half mated
    image_size: int = 112
    seed: int = 0


@dataclass(frozen=True)
class SynthResult:
    """Where the synthetic dataset went and how big it is."""

    out: Path
    num_images: int
    num_identities: int
    verification_bins: dict[str, Path]


# ----------------------------------------------------------------------------- faces


# Degraded images draw their strength from U(MIN_STRENGTH, 1). Below ~0.35 no kind changes
# recognition (the calibration in synth_faces: 1-2 % of pairs fail, as for clean ones), so a
# degradation there is invisible to a recognition-based quality and its "strength" ranks nothing;
# from 0.35 up every degraded image costs recognition something, more the stronger it is
# (docs/reproduction.md compares sets drawn from 0.15 and from 0.35).
MIN_STRENGTH = 0.35


def generator_settings() -> dict[str, float]:
    """The generator's own constants that change what a seed produces; stored in synth.json as
    "generator", so data made with other constants is recognised as such."""
    return {"min_strength": MIN_STRENGTH, "mixed_degraded_fraction": MIXED_DEGRADED_FRACTION}


def _draw_degradation(rng: np.random.Generator) -> tuple[str, float]:
    return DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))], float(rng.uniform(MIN_STRENGTH, 1.0))


# ----------------------------------------------------------------------------- datasets


def _identity_images(
    identity: int, settings: SynthSettings, low_variance: bool
) -> tuple[list[bytes], list[tuple[str, float]]]:
    """JPEG bytes and (degradation, strength) of every training image of one identity."""
    rng = np.random.default_rng([settings.seed, _TRAIN_STREAM, identity])
    traits = draw_traits(rng)
    count = max(2, round(settings.images_per_identity * rng.uniform(0.7, 1.3)))
    images: list[bytes] = []
    truth: list[tuple[str, float]] = []
    if low_variance:
        base = draw_variation(rng, amount=0.3)
        kind, base_strength = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))], rng.uniform(0.45, 0.9)
    for _ in range(count):
        if low_variance:
            # a near-duplicate of one shot: sub-pixel pose jitter, ±2 % light
            var = base.__class__(
                **{
                    **asdict(base),
                    "shift_x": base.shift_x + rng.uniform(-0.006, 0.006),
                    "shift_y": base.shift_y + rng.uniform(-0.006, 0.006),
                    "brightness": base.brightness * rng.uniform(0.98, 1.02),
                    "background": base.background,
                    "clothing": base.clothing,
                }
            )
            degradation, strength = (
                (kind, float(np.clip(base_strength + rng.normal(0, 0.05), 0.05, 1.0)))
                if rng.random() < 0.6
                else (NO_DEGRADATION, 0.0)
            )
        else:
            var = draw_variation(rng)
            degradation, strength = (
                (NO_DEGRADATION, 0.0) if rng.random() < settings.clean_fraction else _draw_degradation(rng)
            )
        pixels, quality = degrade(render_face(traits, var, settings.image_size), degradation, strength, rng)
        images.append(encode_jpeg(pixels, quality))
        truth.append((degradation, strength))
    return images, truth


def _identity_images_job(
    job: tuple[int, bool], *, settings: SynthSettings
) -> tuple[list[bytes], list[tuple[str, float]]]:
    identity, low_variance = job
    return _identity_images(identity, settings, low_variance)


def _map_in_order(
    function: Callable[[Any], Any], items: list[Any], workers: int, desc: str, progress: bool
) -> list[Any]:
    """[function(item) for item in items], in `workers` processes when > 1 (same results: every item
    draws from its own seed stream)."""
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    try:
        if workers <= 1 or len(items) < 2:
            results = []
            for item in items:
                results.append(function(item))
                bar.update()
            return results
        chunk = max(1, len(items) // (8 * workers))
        context = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = []
            for result in pool.map(function, items, chunksize=chunk):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()


MAX_SYNTH_WORKERS = 8


def default_synth_workers() -> int:
    """Processes that render the synthetic images: the CPU count, at most MAX_SYNTH_WORKERS."""
    return max(1, min(MAX_SYNTH_WORKERS, os.cpu_count() or 1))


def _write_train(out: Path, settings: SynthSettings, progress: bool, workers: int = 1) -> int:
    """train.rec/.idx/property and ground_truth.parquet in the InsightFace layout; returns the image count."""
    rng = np.random.default_rng([settings.seed, _TRAIN_STREAM])
    num_low = round(settings.identities * settings.low_variance_fraction)
    low_variance = np.zeros(settings.identities, dtype=bool)
    low_variance[rng.choice(settings.identities, size=num_low, replace=False)] = True
    jobs = [(identity, bool(low_variance[identity])) for identity in range(settings.identities)]
    per_identity = _map_in_order(
        functools.partial(_identity_images_job, settings=settings), jobs, workers, "synth train", progress
    )
    write_insightface_recordio(out, [images for images, _ in per_identity], image_size=settings.image_size)
    rows: dict[str, list] = {
        k: [] for k in ("record", "identity", "image", "degradation", "strength", "low_variance")
    }
    record = 1  # images are records 1..N, in identity order
    for identity, (_, truth) in enumerate(per_identity):
        for image_number, (degradation, strength) in enumerate(truth):
            values = (record, identity, image_number, degradation, strength, bool(low_variance[identity]))
            for name, value in zip(rows, values):
                rows[name].append(value)
            record += 1
    write_table(out / "ground_truth.parquet", _truth_table(rows), durable=False)
    return record - 1


def write_insightface_recordio(out: Path, images_per_identity: list[list[bytes]], *, image_size: int) -> None:
    """OUT/train.rec + train.idx + property in the InsightFace layout; class c = images_per_identity[c].

    Records: 0 = header ([first identity record, end)), 1..N = images in class order,
    then one identity record per class ([first image record, end)).
    """
    num_images = sum(len(images) for images in images_per_identity)
    first_identity_record = num_images + 1
    num_classes = len(images_per_identity)

    def write_rec(tmp_rec: Path) -> None:
        tmp_idx = tmp_rec.with_name(tmp_rec.name + ".idx")
        with RecordIOWriter(tmp_rec, tmp_idx) as writer:
            writer.write(0, pack_header([first_identity_record, first_identity_record + num_classes]))
            key = 1
            ranges = []
            for identity, images in enumerate(images_per_identity):
                start = key
                for jpeg in images:
                    writer.write(key, pack_header(float(identity), id=key) + jpeg)
                    key += 1
                ranges.append((start, key))
            for identity, (start, stop) in enumerate(ranges):
                writer.write(first_identity_record + identity, pack_header([start, stop]))
        tmp_idx.replace(out / "train.idx")

    atomic_write(out / "train.rec", write_rec, durable=False)
    atomic_write_bytes(out / "property", f"{num_classes},{image_size},{image_size}\n".encode(), durable=False)


def _truth_table(rows: dict[str, list]) -> pa.Table:
    types = {
        "record": pa.int64(),
        "index": pa.int64(),
        "pair": pa.int64(),
        "identity": pa.int64(),
        "image": pa.int64(),
        "degradation": pa.string(),
        "strength": pa.float32(),
        "low_variance": pa.bool_(),
    }
    return pa.table({name: pa.array(values, type=types[name]) for name, values in rows.items()})


def _verification_pair(pair: int, *, settings: SynthSettings) -> list[tuple]:
    """Both images of one pair, clean and as in the mixed set: [(identity, clean jpeg, mixed jpeg,
    degradation, strength)] × 2; every pair draws from its own seed stream."""
    identities = settings.verification_identities
    rng = np.random.default_rng([settings.seed, _PAIRS_STREAM, pair])
    first = int(rng.integers(identities))
    second = first if pair % 2 == 0 else int((first + rng.integers(1, identities)) % identities)
    images = []
    for identity in (first, second):
        traits = draw_traits(np.random.default_rng([settings.seed, _VERIFICATION_STREAM, identity]))
        pixels = render_face(traits, draw_variation(rng), settings.image_size)
        degraded = rng.random() < MIXED_DEGRADED_FRACTION
        degradation, strength = _draw_degradation(rng) if degraded else (NO_DEGRADATION, 0.0)
        mixed, quality = degrade(pixels, degradation, strength, rng)
        images.append((identity, encode_jpeg(pixels), encode_jpeg(mixed, quality), degradation, strength))
    return images


def _write_verification(
    out: Path, settings: SynthSettings, progress: bool, workers: int = 1
) -> dict[str, Path]:
    """clean.bin and mixed.bin (the same renderings; mixed degrades a minority of them, see
    MIXED_DEGRADED_FRACTION) with their ground truth. Pair i is mated when i is even."""
    pairs = _map_in_order(
        functools.partial(_verification_pair, settings=settings),
        list(range(settings.verification_pairs)),
        workers,
        "synth verification",
        progress,
    )
    issame = [pair % 2 == 0 for pair in range(settings.verification_pairs)]
    bins: dict[str, list[bytes]] = {name: [] for name in VERIFICATION_SETS}
    truth: dict[str, dict[str, list]] = {
        name: {k: [] for k in ("index", "pair", "identity", "degradation", "strength", "low_variance")}
        for name in VERIFICATION_SETS
    }
    index = 0
    for pair, images in enumerate(pairs):
        for identity, clean, mixed, degradation, strength in images:
            for name, jpeg, kind, value in (
                ("clean", clean, NO_DEGRADATION, 0.0),
                ("mixed", mixed, degradation, strength),
            ):
                bins[name].append(jpeg)
                for column, cell in zip(truth[name], (index, pair, identity, kind, value, False)):
                    truth[name][column].append(cell)
            index += 1
    paths = {}
    for name in VERIFICATION_SETS:
        paths[name] = out / f"{name}.bin"
        atomic_write_bytes(paths[name], pickle.dumps((bins[name], issame), protocol=4), durable=False)
        write_table(out / f"{name}_ground_truth.parquet", _truth_table(truth[name]), durable=False)
    return paths


def synthesize_verification(
    out: Path,
    *,
    identities: int = 400,
    pairs: int = 2000,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
) -> dict[str, Path]:
    """Only the verification sets (clean.bin, mixed.bin and their ground truth) into OUT.

    The same draws as `synthesize(..., seed=seed)` makes for its verification sets with
    these sizes; used to measure a model on fresh identities of a seed it never saw.
    `workers` processes render them (the output does not depend on it).
    """
    if identities < 2 or pairs < 1:
        raise DataError("verification sets need at least 2 identities and 1 pair")
    settings = SynthSettings(verification_identities=identities, verification_pairs=pairs, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bins = _write_verification(out, settings, progress, workers)
    atomic_write_json(
        out / "synth.json",
        {**asdict(settings), "identities": 0, "images_per_identity": 0, "generator": generator_settings()},
    )
    return bins


def synthesize(
    out: Path,
    *,
    identities: int = 200,
    images_per_identity: int = 12,
    low_variance_fraction: float = 0.15,
    clean_fraction: float = 0.5,
    verification_identities: int | None = None,
    verification_pairs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
) -> SynthResult:
    """Write the synthetic dataset into OUT (see the module docstring); deterministic by seed.

    Verification sizes default to scale with `identities` (at most 60 identities, 300 pairs).
    `workers` processes render the images (the output does not depend on it).
    """
    settings = SynthSettings(
        identities=identities,
        images_per_identity=images_per_identity,
        low_variance_fraction=low_variance_fraction,
        clean_fraction=clean_fraction,
        verification_identities=(
            verification_identities
            if verification_identities is not None
            else min(60, max(4, identities // 3))
        ),
        verification_pairs=verification_pairs if verification_pairs is not None else min(300, 3 * identities),
        seed=seed,
    )
    if identities < 1 or images_per_identity < 1:
        raise DataError(
            f"need at least one identity and one image each, got {identities} × {images_per_identity}"
        )
    if settings.verification_identities < 2 or settings.verification_pairs < 1:
        raise DataError("verification sets need at least 2 identities and 1 pair")
    if not 0.0 <= low_variance_fraction <= 1.0 or not 0.0 <= clean_fraction <= 1.0:
        raise DataError("low_variance_fraction and clean_fraction must lie in [0, 1]")
    out = Path(out)
    if (out / "dataset.json").exists():
        raise DataError("holds a converted dataset; synthesize into another folder", path=out)
    out.mkdir(parents=True, exist_ok=True)
    num_images = _write_train(out, settings, progress, workers)
    bins = _write_verification(out, settings, progress, workers)
    atomic_write_json(out / "synth.json", {**asdict(settings), "generator": generator_settings()})
    log.info("synthesized %d images of %d identities into %s", num_images, identities, out)
    return SynthResult(out=out, num_images=num_images, num_identities=identities, verification_bins=bins)


# ----------------------------------------------------------------------------- identity-labelled sets


@dataclass(frozen=True)
class IdentitySetSettings:
    """What `synthesize_identity_set` draws; stored in OUT/synth.json (with `kind` and `generator`)."""

    identities: int
    images_per_identity: int
    seed: int
    image_size: int = 112


def identity_folder(identity: int, identities: int) -> str:
    """`id-00042`: the folder of an identity, zero-padded so that name order is number order."""
    return f"id-{identity:0{max(5, len(str(identities - 1)))}d}"


def _identity_set_images(identity: int, *, settings: IdentitySetSettings) -> list[tuple[bytes, str, float]]:
    """(JPEG, degradation, strength) of every image of one identity of an identity-labelled set:
    the identity's traits from the seed's verification stream, its images' draws from its own."""
    traits = draw_traits(np.random.default_rng([settings.seed, _VERIFICATION_STREAM, identity]))
    rng = np.random.default_rng([settings.seed, _IDENTITY_SET_STREAM, identity])
    images = []
    for _ in range(settings.images_per_identity):
        pixels = render_face(traits, draw_variation(rng), settings.image_size)
        degraded = rng.random() < MIXED_DEGRADED_FRACTION
        degradation, strength = _draw_degradation(rng) if degraded else (NO_DEGRADATION, 0.0)
        shown, quality = degrade(pixels, degradation, strength, rng)
        images.append((encode_jpeg(shown, quality), degradation, strength))
    return images


def synthesize_identity_set(
    out: Path,
    *,
    identities: int = 300,
    images_per_identity: int = 8,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
) -> SynthResult:
    """An identity-labelled evaluation set in OUT (see the module docstring); deterministic by seed.

    Each image is degraded with probability MIXED_DEGRADED_FRACTION, at a strength drawn from
    U(MIN_STRENGTH, 1), as in the mixed verification set. Writes `OUT/<identity>/<n>.jpg`,
    `OUT/ground_truth.parquet`, then `OUT/synth.json` last; an OUT whose synth.json holds these
    settings is complete and left as it is. `workers` processes render the images (the output
    does not depend on it).
    """
    if identities < 2 or images_per_identity < 2:
        raise DataError(
            "an identity-labelled set needs at least 2 identities with at least 2 images each (mated "
            f"and non-mated pairs), got {identities} × {images_per_identity}"
        )
    settings = IdentitySetSettings(identities=identities, images_per_identity=images_per_identity, seed=seed)
    record = {"kind": IDENTITY_SET_KIND, **asdict(settings), "generator": generator_settings()}
    out = Path(out)
    result = SynthResult(
        out=out, num_images=identities * images_per_identity, num_identities=identities, verification_bins={}
    )
    if out.exists() and any(out.iterdir()):
        try:
            existing = json.loads((out / "synth.json").read_text())
        except (OSError, ValueError):
            existing = None
        if existing == record:
            log.info("%s already holds this identity-labelled set (synth.json): left as it is", out)
            return result
        raise DataError(
            "exists and holds something else (no synth.json of these settings): write the set into a "
            "new or empty folder",
            path=out,
        )
    out.mkdir(parents=True, exist_ok=True)
    per_identity = _map_in_order(
        functools.partial(_identity_set_images, settings=settings),
        list(range(identities)),
        workers,
        "synth identity set",
        progress,
    )
    width = len(str(images_per_identity - 1))
    rows: dict[str, list] = {k: [] for k in ("path", "identity", "image", "degradation", "strength")}
    for identity, images in enumerate(per_identity):
        folder = identity_folder(identity, identities)
        (out / folder).mkdir(exist_ok=True)
        for number, (jpeg, degradation, strength) in enumerate(images):
            path = f"{folder}/{number:0{width}d}.jpg"
            atomic_write_bytes(out / path, jpeg, durable=False)
            for name, value in zip(rows, (path, identity, number, degradation, strength)):
                rows[name].append(value)
    truth = pa.table(
        {
            "path": pa.array(rows["path"], pa.string()),
            "identity": pa.array(rows["identity"], pa.int64()),
            "image": pa.array(rows["image"], pa.int64()),
            "degradation": pa.array(rows["degradation"], pa.string()),
            "strength": pa.array(rows["strength"], pa.float32()),
        }
    )
    write_table(out / "ground_truth.parquet", truth, durable=False)
    atomic_write_json(out / "synth.json", record)
    log.info("synthesized %d images of %d identities into %s", result.num_images, identities, out)
    return result
