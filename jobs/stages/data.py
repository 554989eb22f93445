"""The data stages: synth, convert, bins (each with its MLflow lineage run) and the preview grid.

`run_synth`, `run_convert` and `run_bins` are what `igfiqa prep synth|convert|bins` do: run the
data_prep stage, then log an MLflow run (experiment igfiqa-<stage>) with the output's
dataset_fingerprint and the source files' checksums, the lineage that training and evaluation
runs point back to. `synth_stage`, `convert_stage`, `bins_stage` and `preview_stage` are the
same stages in a working folder, reusing what an earlier call finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import UserError
from jobs.stages.work import StageRecord, WorkFolder, read_json_object, shown_path

if TYPE_CHECKING:
    from data_prep.dataset import DatasetInfo
    from data_prep.synth import SynthResult
    from jobs.cluster import ClusterProfile
    from pipeline.config import AugmentConfig


@dataclass(frozen=True)
class SynthSpec:
    """The synthetic dataset's settings (`data_prep.synth.synthesize`'s keywords)."""

    identities: int = 200
    images_per_identity: int = 12
    low_variance_fraction: float = 0.15
    clean_fraction: float = 0.5  # as `igfiqa prep synth`, which the recipe was tuned with
    verification_identities: int | None = None
    verification_pairs: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class IdentitySetSpec:
    """An identity-labelled evaluation set's settings (`data_prep.synth.synthesize_identity_set`'s)."""

    identities: int = 300
    images_per_identity: int = 8
    seed: int = 0


@dataclass(frozen=True)
class ConvertedTrain:
    """`run_convert`'s result: the dataset, the SLURM array that wrote it (if any), the MLflow run."""

    info: DatasetInfo
    array_job_id: str  # "" when converted here
    mlflow_run_id: str | None
    from_files: bool = False  # converted from an image folder or a .lst list


def _log_lineage(
    stage: str, tracking_uri: str | None, *, params: dict[str, Any], tags: dict[str, str], metrics: dict
) -> str | None:
    """The stage's MLflow lineage run (None: not tracked, or tracking failed with a warning)."""
    if tracking_uri is None:
        return None
    from pipeline.tracking.lineage import log_stage_run

    return log_stage_run(stage, params=params, tags=tags, metrics=metrics, tracking_uri=tracking_uri)


def run_synth(
    out: Path, spec: SynthSpec, *, tracking_uri: str | None = "", workers: int | None = None
) -> tuple[SynthResult, str | None]:
    """Write the synthetic dataset; (its result, the MLflow run id). `tracking_uri=None`: no MLflow run.

    `workers` processes render the images (default: `default_synth_workers()`); the output does not
    depend on it.
    """
    from data_prep.checksums import xxh128_file
    from data_prep.synth import default_synth_workers, synthesize

    started = time.monotonic()
    result = synthesize(
        out,
        identities=spec.identities,
        images_per_identity=spec.images_per_identity,
        low_variance_fraction=spec.low_variance_fraction,
        clean_fraction=spec.clean_fraction,
        verification_identities=spec.verification_identities,
        verification_pairs=spec.verification_pairs,
        seed=spec.seed,
        progress=True,
        workers=default_synth_workers() if workers is None else workers,
    )
    seconds = time.monotonic() - started
    if tracking_uri is None:
        return result, None
    # the written files' checksums: `prep convert` and `prep bins` record the same ones as source_xxh128.*
    written = [result.out / "train.rec", *result.verification_bins.values()]
    run_id = _log_lineage(
        "synth",
        tracking_uri,
        params={
            "out": Path(out).resolve(),
            "identities": spec.identities,
            "images_per_identity": spec.images_per_identity,
            "low_variance_fraction": spec.low_variance_fraction,
            "clean_fraction": spec.clean_fraction,
            "verification_identities": spec.verification_identities or "",
            "verification_pairs": spec.verification_pairs or "",
            "seed": spec.seed,
        },
        tags={f"output_xxh128.{path.name}": xxh128_file(path) for path in written},
        metrics={
            "images": float(result.num_images),
            "classes": float(result.num_identities),
            "seconds": seconds,
        },
    )
    return result, run_id


def run_synth_identity_set(
    out: Path, spec: IdentitySetSpec, *, tracking_uri: str | None = "", workers: int | None = None
) -> tuple[SynthResult, str | None]:
    """Write an identity-labelled evaluation set (an image folder + ground truth); (its result, the
    MLflow run id of experiment igfiqa-synth). `tracking_uri=None`: no MLflow run."""
    from data_prep.checksums import xxh128_file
    from data_prep.synth import default_synth_workers, synthesize_identity_set

    started = time.monotonic()
    result = synthesize_identity_set(
        out,
        identities=spec.identities,
        images_per_identity=spec.images_per_identity,
        seed=spec.seed,
        progress=True,
        workers=default_synth_workers() if workers is None else workers,
    )
    if tracking_uri is None:
        return result, None
    run_id = _log_lineage(
        "synth",
        tracking_uri,
        params={
            "out": Path(out).resolve(),
            "identity_set": True,
            "identities": spec.identities,
            "images_per_identity": spec.images_per_identity,
            "seed": spec.seed,
        },
        tags={"output_xxh128.ground_truth.parquet": xxh128_file(result.out / "ground_truth.parquet")},
        metrics={
            "images": float(result.num_images),
            "classes": float(result.num_identities),
            "seconds": time.monotonic() - started,
        },
    )
    return result, run_id


def run_convert(
    source: Path,
    out: Path,
    *,
    samples_per_shard: int = 5000,
    workers: int = 1,
    seed: int = 0,
    cluster: ClusterProfile | Path | str | None = None,
    tracking_uri: str | None = "",
    skip_bad: bool = False,
    image_check: str = "structure",
    wait_lock: float = 0.0,
    resize: int | None = None,
) -> ConvertedTrain:
    """Convert a training set (RecordIO, an image folder or a .lst list) into shards, here or as a
    SLURM array on `cluster`; then log it.

    Bad image records or files stop it (all listed) unless `skip_bad`; one conversion writes into
    `out` at a time (`wait_lock` seconds to wait for another, 0 = refuse at once). `resize`: see
    `data_prep.convert.prepare_conversion`.
    """
    from data_prep.file_source import is_file_source

    from_files = is_file_source(Path(source))
    started = time.monotonic()
    array_job_id = ""
    if cluster is not None:
        from data_prep.convert import locked_output
        from jobs.prep_job import start_conversion

        with locked_output(out, wait=wait_lock):
            array = start_conversion(
                source,
                out,
                profile=cluster,
                samples_per_shard=samples_per_shard,
                seed=seed,
                skip_bad=skip_bad,
                image_check=image_check,
                resize=resize,
            )
            info = array.wait()
        array_job_id = array.array_id
    else:
        from data_prep.convert import convert

        info = convert(
            source,
            out,
            samples_per_shard=samples_per_shard,
            workers=workers,
            seed=seed,
            skip_bad=skip_bad,
            image_check=image_check,
            wait_lock=wait_lock,
            resize=resize,
        )
    seconds = time.monotonic() - started
    if tracking_uri is None:
        return ConvertedTrain(info, array_job_id, None, from_files)
    from pipeline.tracking.lineage import lineage_tags, stage_metrics

    submitted_to = "" if cluster is None else getattr(cluster, "source", None) or str(cluster)
    tags = lineage_tags([info], per_set=False)
    if array_job_id:
        tags["slurm_array_job_id"] = array_job_id
    run_id = _log_lineage(
        "convert",
        tracking_uri,
        params={
            "source": Path(source).resolve(),
            "out": Path(out).resolve(),
            "samples_per_shard": samples_per_shard,
            "workers": workers,
            "seed": seed,
            "submit": submitted_to,
            "shards": len(info.shards),
            "skip_bad": skip_bad,
            "image_check": image_check,
            "resize": resize or "",
        },
        tags=tags,
        metrics=stage_metrics([info], seconds) | {"dropped": float(info.dropped)},
    )
    return ConvertedTrain(info, array_job_id, run_id, from_files)


def prepare_identity_set(
    source: Path, converted: Path, spec: IdentitySetSpec, *, tracking_uri: str | None = ""
) -> Path:
    """An identity-labelled set ready to evaluate: synthesized into SOURCE and converted into CONVERTED,
    each unless done, with its ground truth (degradation strength per image, the oracle's) copied
    beside the shards; CONVERTED. `tracking_uri=None`: no MLflow lineage runs."""
    import shutil

    run_synth_identity_set(source, spec, tracking_uri=tracking_uri)
    if not (converted / "dataset.json").is_file():
        run_convert(source, converted, tracking_uri=tracking_uri)
    shutil.copy2(source / "ground_truth.parquet", converted / "ground_truth.parquet")
    return converted


def run_bins(
    files: Sequence[Path], out: Path, *, tracking_uri: str | None = ""
) -> tuple[list[DatasetInfo], str | None]:
    """Convert verification `.bin` files into shards, one set per file; (the sets, the MLflow run id)."""
    from data_prep.bins import convert_bins

    started = time.monotonic()
    infos = convert_bins(list(files), out, progress=True)
    seconds = time.monotonic() - started
    if tracking_uri is None:
        return infos, None
    from pipeline.tracking.lineage import lineage_tags, stage_metrics

    run_id = _log_lineage(
        "bins",
        tracking_uri,
        params={
            "source": " ".join(str(Path(p).resolve()) for p in files),
            "out": Path(out).resolve(),
            "sets": " ".join(info.root.name for info in infos),
        },
        tags=lineage_tags(infos, per_set=True),
        metrics=stage_metrics(infos, seconds) | {"pairs": float(sum(i.num_images // 2 for i in infos))},
    )
    return infos, run_id


# ----------------------------------------------------------------------------- in a working folder


def synth_stage(paths: WorkFolder, spec: SynthSpec, record: StageRecord) -> None:
    """Write the synthetic dataset unless an identical one is there; a different one (other sizes,
    fractions or seed, or made by an earlier generator: `data_prep.synth.generator_settings()`) is
    an error."""
    from data_prep.synth import generator_settings

    wanted = {
        "identities": spec.identities,
        "images_per_identity": spec.images_per_identity,
        "low_variance_fraction": spec.low_variance_fraction,
        "clean_fraction": spec.clean_fraction,
        "seed": spec.seed,
        "generator": generator_settings(),
    }
    existing = read_json_object(paths.synth / "synth.json")
    if existing is not None:
        differing = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
        if differing:
            listed = ", ".join(f"{k} {old} (asked {new})" for k, (old, new) in differing.items())
            raise UserError(
                f"{paths.synth} was synthesized with other settings: {listed}; "
                f"use another --out or remove {paths.out}"
            )
        record.reused, record.note = True, "synth.json exists"
        return
    if (paths.train / "dataset.json").exists():
        raise UserError(
            f"{paths.train} holds a converted dataset but {paths.synth}/synth.json is missing: "
            f"the folder is from something else; use another --out or remove {paths.out}"
        )
    result, _ = run_synth(paths.synth, spec, tracking_uri=paths.tracking_uri)
    record.note = f"{result.num_images} images of {result.num_identities} identities"


def convert_stage(paths: WorkFolder, record: StageRecord) -> None:
    """Convert train.rec into shards (data_prep.convert resumes a killed conversion by itself)."""
    if (paths.train / "dataset.json").is_file():
        record.reused, record.note = True, "dataset.json exists"
        return
    info = run_convert(paths.synth, paths.train, tracking_uri=paths.tracking_uri).info
    record.note = f"{info.num_images} images, {info.num_classes} classes, {len(info.shards)} shard(s)"


def bins_stage(paths: WorkFolder, record: StageRecord) -> None:
    """Convert every verification .bin of the synthetic data that is not converted yet."""
    bins = sorted(paths.synth.glob("*.bin"))
    if not bins:
        raise UserError(
            f"{paths.synth}: no verification .bin files; remove {paths.synth} to synthesize again"
        )
    todo = [b for b in bins if not (paths.val / b.stem / "dataset.json").is_file()]
    if not todo:
        record.reused, record.note = True, f"{', '.join(b.stem for b in bins)}: dataset.json exist"
        return
    infos, _ = run_bins(todo, paths.val, tracking_uri=paths.tracking_uri)
    record.note = ", ".join(f"{i.root.name} {i.num_images // 2} pairs" for i in infos)


def preview_stage(paths: WorkFolder, augment: AugmentConfig, record: StageRecord) -> None:
    """The augmentation grid through the training graph, with the training config's settings."""
    from pipeline.data.preview import write_preview

    if paths.preview.is_file() and paths.preview.stat().st_size > 0:
        record.reused, record.note = True, "the PNG exists"
        return
    write_preview(paths.train, paths.preview, augment)
    record.note = shown_path(paths.preview)


def prepare_training_set(
    paths: WorkFolder, spec: SynthSpec, say: Callable[[str], None], what: str = ""
) -> None:
    """synth and convert (no bins) unless an earlier call finished them, each said as `<what><stage>: done|reused`."""
    for record, stage in (
        (StageRecord("synth"), lambda r: synth_stage(paths, spec, r)),
        (StageRecord("convert"), lambda r: convert_stage(paths, r)),
    ):
        stage(record)
        note = f" ({record.note})" if record.note else ""
        say(f"  {what}{record.name}: {'reused' if record.reused else 'done'}{note}")


def prepare_data(paths: WorkFolder, spec: SynthSpec) -> list[StageRecord]:
    """synth, convert and bins, each unless an earlier call finished it; their records."""
    records = [StageRecord("synth"), StageRecord("convert"), StageRecord("bins")]
    synth_stage(paths, spec, records[0])
    convert_stage(paths, records[1])
    bins_stage(paths, records[2])
    return records
