"""`igfiqa curate score`: the quality of every image of a converted dataset, resumable per shard.

Three stages, each idempotent, so the same code runs here and as a SLURM array (jobs/curate_job.py);
the output folder's plan, lock and temp files are data_prep.sharded_output's, with the plan and
the per-shard parts in OUT/.score/:

1. `prepare_scoring(checkpoint, dataset, out)` loads the model, takes its fingerprint
   (`pipeline.method.model.model_fingerprint`) and the dataset's, and writes the plan
   (`OUT/.score/plan.json`). Re-running with the same model, dataset and batch size reuses it;
   an OUT scoring anything else is refused.
2. `score_shards(out, shards)` scores the images of each source shard (reading only those
   shards' manifest rows: a task's memory does not grow with the dataset), in manifest order,
   through the decode-only DALI graph (`pipeline.data.dali_graph.build_decode_pipeline`: the
   training graph's decoder and normalisation, no augmentation; CPU operators with
   `device_id=None`, the "mixed" decoder on a GPU) and the model in eval mode, and writes
   `OUT/.score/part-NNNNN.parquet` atomically (the plan id in its metadata is its done
   record). A part already written for this plan is skipped, so a killed run redone scores only what is missing; batches never cross a shard,
   so a shard scored again gives the same numbers on the same device.
3. `finalize_scoring(out)` joins the parts in manifest order and writes `OUT/quality.parquet`
   (data_prep.quality_file: key, record, label, quality; the dataset's and the model's
   fingerprints, the checkpoint and its training run in the metadata), atomically and last.
   Given a calibration of the model (data_prep.calibration_map), the file also gets
   expected_fnmr and quality_score, and the calibration's identity in its metadata; the parts
   do not depend on it, so a scoring resumed with or without one reuses them.

`score_dataset` runs the three here under OUT's lock (`ShardedOutput.locked`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data_prep.atomic import atomic_write, canonical_json
from data_prep.calibration_map import CalibrationMap
from data_prep.dataset import DatasetInfo, dataset_fingerprint, load_dataset_info
from data_prep.errors import DataError
from data_prep.images import BadImageError, check_image, image_size, jpeg_sizes_quick
from data_prep.manifest import ShardRows, read_manifest_rows
from data_prep.quality_file import QUALITY_FILE, QualitySource, write_quality_file
from data_prep.shard_reader import ShardReader
from data_prep.sharded_output import ShardedOutput, disk_full_is_a_data_error, fault_point
from data_prep.shards import shard_stem
from pipeline.checkpoint import training_lineage
from pipeline.config import TrainConfig
from pipeline.data.dali_graph import DECODE_OUTPUT_NAMES, build_decode_pipeline
from pipeline.data.loader import dali_device_id
from pipeline.method.model import load_inference_model, model_fingerprint

log = logging.getLogger(__name__)

SCORE_DIR = ".score"
PLAN_FILE = "plan.json"
PART_PLAN_KEY = b"igfiqa.score.plan_id"
DEFAULT_BATCH_SIZE = 256
DEFAULT_THREADS = 2
PREFETCH = 2
PART_SCHEMA = pa.schema([("row", pa.int64()), ("quality", pa.float32())])


# ----------------------------------------------------------------------------- images


class ScoringImages:
    """The images of a converted dataset (train or verification) by manifest row: keys, records,
    labels and encoded bytes (zero-copy views of the shard tars, structurally checked).

    `shards`: hold only the rows of these shards (an array task's), read from the manifest's
    row groups that hold them, so a task's memory does not grow with the dataset; the columns
    (`keys`, `records`, ...) are then those rows' (`rows` holds their manifest row numbers) and
    every method still takes manifest row numbers. The rows are grouped by shard once
    (data_prep.manifest.ShardRows).
    """

    def __init__(self, dataset: Path | DatasetInfo, *, shards: Sequence[int] | None = None) -> None:
        self.info = dataset if isinstance(dataset, DatasetInfo) else load_dataset_info(Path(dataset))
        path = self.info.manifest_path
        train = self.info.kind == "train"
        columns = ["key", "record", "label"] if train else ["key", "index"]
        try:
            shard_column = pq.read_table(path, columns=["shard"]).column("shard").to_numpy()
            if len(shard_column) != self.info.num_images:
                raise DataError(
                    f"{len(shard_column)} rows but dataset.json says {self.info.num_images}", path=path
                )
            self.by_shard = ShardRows(shard_column, len(self.info.shards))
            del shard_column
            if shards is None:
                self.rows = np.arange(self.info.num_images, dtype=np.int64)
                table = pq.read_table(path, columns=[*columns, "shard", "offset", "nbytes"])
            else:
                held = [self.by_shard.rows(s) for s in sorted(set(shards)) if 0 <= s < len(self.info.shards)]
                self.rows = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
                table = read_manifest_rows(path, [*columns, "shard", "offset", "nbytes"], self.rows)
        except (OSError, ValueError, KeyError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read the manifest columns: {exc}", path=path) from None
        self._all = shards is None
        self.keys = table.column("key").to_numpy(zero_copy_only=False).astype(str)
        # a verification set's record and label are the image's index in its .bin (docs/contracts.md)
        self.records = table.column("record" if train else "index").to_numpy().astype(np.int64)
        self.labels = table.column("label" if train else "index").to_numpy().astype(np.int64)
        self.shards = table.column("shard").to_numpy().astype(np.int64)
        self.offsets = table.column("offset").to_numpy().astype(np.int64)
        self.nbytes = table.column("nbytes").to_numpy().astype(np.int64)
        del table
        self.reader = ShardReader(self.info.tar_paths)
        outside = self.reader.first_row_outside(self.shards, self.offsets, self.nbytes)
        if outside is not None:
            raise DataError(
                f"row {self.rows[outside]} (key {self.keys[outside]}) points outside its shard: "
                f"check the dataset with `igfiqa prep inspect {self.info.root}`",
                path=path,
            )

    def __len__(self) -> int:
        return len(self.keys)

    def held(self, rows: np.ndarray) -> np.ndarray:
        """Positions in the columns of manifest rows `rows` (which must be held)."""
        return np.asarray(rows, dtype=np.int64) if self._all else np.searchsorted(self.rows, rows)

    def rows_of_shard(self, shard: int) -> np.ndarray:
        """Manifest rows stored in shard `shard`, in manifest order."""
        return self.by_shard.rows(shard)

    def shard_of(self, row: int) -> int:
        return int(self.shards[self.held(np.array([row]))[0]])

    def encoded(self, rows: np.ndarray) -> list[np.ndarray]:
        """Encoded bytes of `rows`; DataError naming the shard and key of one that is not a sound image
        (DALI's CPU decoder can crash the process on some broken headers)."""
        out = self.encoded_unchecked(rows)
        if not out:
            return out
        lengths = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
        ends = np.cumsum(lengths)
        accepted, height, width = jpeg_sizes_quick(np.concatenate(out), ends - lengths, ends)
        accepted &= (height == self.info.image_size[0]) & (width == self.info.image_size[1])
        for i in np.flatnonzero(~accepted).tolist():
            self._check_one(int(rows[i]), out[i])
        return out

    def encoded_unchecked(self, rows: np.ndarray) -> list[np.ndarray]:
        """Encoded bytes of `rows`, as stored."""
        at = self.held(rows)
        return [
            self.reader.read(s, o, n)
            for s, o, n in zip(self.shards[at].tolist(), self.offsets[at].tolist(), self.nbytes[at].tolist())
        ]

    def _check_one(self, row: int, data: np.ndarray) -> None:
        try:
            size = image_size(data)
        except BadImageError as exc:
            problem = str(exc)
        else:
            if size == self.info.image_size:
                return
            problem = f"image is {size[0]}x{size[1]}, the dataset's are {self.info.image_size}"
        raise self.image_error(row, problem)

    def image_error(self, row: int, problem: str) -> DataError:
        at = int(self.held(np.array([row]))[0])
        return DataError(
            f"key {self.keys[at]} (manifest row {row}): {problem}; check every image with "
            f"`igfiqa prep inspect {self.info.root} --verify-decode`",
            path=self.info.tar_paths[int(self.shards[at])],
            offset=int(self.offsets[at]),
        )

    def close(self) -> None:
        self.reader.close()


def shard_batches(images: ScoringImages, shards: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Manifest rows of `shards` cut into batches of at most `batch_size`, none crossing a shard."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be positive")
    batches = []
    for shard in shards:
        rows = images.rows_of_shard(shard)
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches


class DatasetScorer:
    """Quality of manifest rows: decode-only DALI graph → model (eval mode, no gradient)."""

    def __init__(
        self,
        model: torch.nn.Module,
        images: ScoringImages,
        *,
        device: torch.device,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_threads: int = DEFAULT_THREADS,
        prefetch: int = PREFETCH,
    ) -> None:
        self.model = model.eval()
        self.images = images
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.prefetch = prefetch

    def iter_scores(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, quality float32) for every batch of manifest rows, in order."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if not batches:
            return
        fed = iter(batches)

        def source() -> tuple[list[np.ndarray], np.ndarray]:
            rows = next(fed)  # StopIteration ends the run
            return self.images.encoded(rows), np.ascontiguousarray(rows, dtype=np.int64)

        pipe = build_decode_pipeline(
            source,
            batch_size=max(len(b) for b in batches),
            device_id=dali_device_id(self.device),
            num_threads=self.num_threads,
            prefetch=self.prefetch,
        )
        iterator = DALIGenericIterator([pipe], list(DECODE_OUTPUT_NAMES), prepare_first_batch=False)
        done = 0
        while True:
            try:
                (outputs,) = next(iterator)
            except StopIteration:
                return
            except RuntimeError as exc:  # DALI names an operator, not the image
                failure = self._decode_failure(batches[done : done + 1 + self.prefetch])
                if failure is None:
                    raise
                raise failure from exc
            rows = outputs["rows"].numpy().reshape(-1)
            if not np.array_equal(rows, batches[done]):
                raise RuntimeError(f"DALI returned other rows than batch {done} was fed")
            yield rows, self.forward(outputs["images"])
            done += 1

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> np.ndarray:
        """The quality head's output for a batch of decoded images (any device)."""
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
        _, quality = self.model(images)
        return quality.float().cpu().numpy()

    def _decode_failure(self, candidates: Sequence[np.ndarray]) -> DataError | None:
        for rows in candidates:
            for row, data in zip(rows.tolist(), self.images.encoded_unchecked(rows)):
                _, problem = check_image(data, level="decode")
                if problem is not None:
                    return self.images.image_error(row, f"cannot be decoded ({problem})")
        return None


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ScoringPlan:
    """What a scoring run computes: stored in OUT/.score/plan.json."""

    dataset: str  # absolute path
    checkpoint: str  # absolute path
    dataset_fingerprint: str
    model_fingerprint: str
    train_run_id: str
    global_step: int
    kind: str
    num_images: int
    num_shards: int
    batch_size: int

    @property
    def plan_id(self) -> str:
        """sha256 of what determines the scores: the dataset, the weights, the batching."""
        identity = {
            "dataset_fingerprint": self.dataset_fingerprint,
            "model_fingerprint": self.model_fingerprint,
            "batch_size": self.batch_size,
        }
        return hashlib.sha256(canonical_json(identity)).hexdigest()

    def quality_source(self) -> QualitySource:
        return QualitySource(
            dataset_fingerprint=self.dataset_fingerprint,
            model_fingerprint=self.model_fingerprint,
            dataset_kind=self.kind,
            num_images=self.num_images,
            checkpoint=self.checkpoint,
            train_run_id=self.train_run_id,
            global_step=self.global_step,
        )


def scoring_output(out: Path) -> ShardedOutput:
    """OUT as the output folder of a scoring (data_prep.sharded_output): plan and parts in .score/."""
    return ShardedOutput(out, plan_file=PLAN_FILE, bookkeeping=SCORE_DIR)


def _part_path(out: Path, shard: int) -> Path:
    return scoring_output(out).prep / f"part-{shard_stem(shard)[len('shard-') :]}.parquet"


def load_scoring_plan(out: Path) -> ScoringPlan:
    """The plan in OUT/.score/plan.json; DataError when there is none."""
    output = scoring_output(out)
    raw = output.read_plan(missing="no scoring plan here: run `igfiqa curate score` first")
    raw.pop("plan_id", None)
    try:
        return ScoringPlan(**raw)
    except (ValueError, TypeError) as exc:
        raise DataError(f"malformed scoring plan: {exc}", path=output.plan_path) from None


def prepare_scoring(
    checkpoint: Path,
    dataset: Path,
    out: Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loaded: tuple[torch.nn.Module, TrainConfig] | None = None,
) -> ScoringPlan:
    """Write OUT's scoring plan (idempotent); DataError when OUT scores another dataset or model.

    `loaded`: the checkpoint's (model, config) already loaded (else they are loaded here, on the CPU).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    info = load_dataset_info(Path(dataset))
    model, config = loaded if loaded is not None else load_inference_model(checkpoint, "cpu")
    size = config.data.image_size
    if info.image_size != (size, size):
        raise DataError(
            f"images are {info.image_size[0]}x{info.image_size[1]}, the model takes {size}x{size}",
            path=info.root,
        )
    train_run_id, step = training_lineage(checkpoint)
    plan = ScoringPlan(
        dataset=str(info.root.resolve()),
        checkpoint=str(Path(checkpoint).resolve()),
        dataset_fingerprint=dataset_fingerprint(info.root),
        model_fingerprint=model_fingerprint(model),
        train_run_id=train_run_id,
        global_step=step,
        kind=info.kind,
        num_images=info.num_images,
        num_shards=len(info.shards),
        batch_size=batch_size,
    )
    output = scoring_output(out)
    output.exists()  # refuses a file
    if output.has_plan():
        existing = load_scoring_plan(out)
        if existing.plan_id == plan.plan_id:
            if existing != plan:  # moved files, same content: keep the scores, record where they are now
                output.write_plan({"plan_id": plan.plan_id, **asdict(plan)})
            return plan
        differs = [
            f"{name} {getattr(existing, name)} (now {getattr(plan, name)})"
            for name in ("dataset_fingerprint", "model_fingerprint", "batch_size")
            if getattr(existing, name) != getattr(plan, name)
        ]
        raise DataError(
            f"holds the scores of another run ({'; '.join(differs)}): choose another --out", path=out
        )
    if (output.root / QUALITY_FILE).exists():
        raise DataError(f"holds a {QUALITY_FILE} of another run: choose another --out", path=output.root)
    output.write_plan({"plan_id": plan.plan_id, **asdict(plan)})
    return plan


def part_is_done(out: Path, plan: ScoringPlan, shard: int, expected_rows: int) -> bool:
    """Whether shard `shard`'s part holds this plan's scores for all its rows."""
    path = _part_path(out, shard)
    if not path.is_file():
        return False
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid):
        return False
    metadata = parquet.schema_arrow.metadata or {}
    return metadata.get(PART_PLAN_KEY) == plan.plan_id.encode() and parquet.metadata.num_rows == expected_rows


def score_shards(
    out: Path,
    shards: Sequence[int],
    *,
    device: str | torch.device = "auto",
    num_threads: int = DEFAULT_THREADS,
    model: torch.nn.Module | None = None,
    progress: bool = False,
) -> list[int]:
    """Score the source shards `shards` of OUT's plan (an array task's range); returns those it
    scored (the others were done). The checkpoint and dataset must still be the planned ones."""
    from pipeline.parallel.env import resolve_device

    plan = load_scoring_plan(out)
    bad = [s for s in shards if not 0 <= s < plan.num_shards]
    if bad:
        raise DataError(f"shards {bad} do not exist; the dataset has {plan.num_shards}", path=plan.dataset)
    images = ScoringImages(Path(plan.dataset), shards=shards)
    try:
        todo = [s for s in shards if not part_is_done(out, plan, s, len(images.rows_of_shard(s)))]
        if not todo:
            return []
        if dataset_fingerprint(Path(plan.dataset)) != plan.dataset_fingerprint:
            raise DataError(
                "changed since its scoring was planned: score it into a new --out", path=plan.dataset
            )
        torch_device = resolve_device(device)
        if model is None:
            model, _ = load_inference_model(plan.checkpoint, torch_device)
        else:
            model = model.to(torch_device)
        if model_fingerprint(model) != plan.model_fingerprint:
            raise DataError(
                "holds other weights than when this scoring was planned: score into a new --out",
                path=plan.checkpoint,
            )
        scorer = DatasetScorer(
            model, images, device=torch_device, batch_size=plan.batch_size, num_threads=num_threads
        )
        _score_into_parts(out, plan, scorer, todo, progress=progress)
        return todo
    finally:
        images.close()


def _score_into_parts(
    out: Path, plan: ScoringPlan, scorer: DatasetScorer, shards: list[int], *, progress: bool
) -> None:
    batches = shard_batches(scorer.images, shards, plan.batch_size)
    pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in shards}
    remaining = {s: len(scorer.images.rows_of_shard(s)) for s in shards}
    total = sum(remaining.values())
    with tqdm(total=total, desc="score", unit="img", disable=not progress, mininterval=1.0) as bar:
        for rows, quality in scorer.iter_scores(batches):
            shard = scorer.images.shard_of(int(rows[0]))
            pending[shard].append((rows, quality))
            remaining[shard] -= len(rows)
            bar.update(len(rows))
            if remaining[shard] == 0:
                _write_part(out, plan, shard, pending.pop(shard))


def _write_part(out: Path, plan: ScoringPlan, shard: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    rows = np.concatenate([r for r, _ in parts])
    quality = np.concatenate([q for _, q in parts]).astype(np.float32)
    nonfinite = int((~np.isfinite(quality)).sum())
    if nonfinite:
        log.warning(
            "shard %d: the model gave %d non-finite scores (curate filter will refuse them)", shard, nonfinite
        )
    table = pa.table({"row": rows, "quality": quality}, schema=PART_SCHEMA)
    table = table.replace_schema_metadata({PART_PLAN_KEY: plan.plan_id.encode()})
    atomic_write(
        _part_path(out, shard), lambda tmp: pq.write_table(table, tmp, use_dictionary=False), durable=False
    )
    fault_point(shard)


@dataclass(frozen=True)
class ScoredDataset:
    """A finished scoring: the quality file and what it holds."""

    path: Path
    plan: ScoringPlan
    quality: np.ndarray  # per manifest row
    scored_now: int = 0  # images this call scored (the others were scored by an earlier run)


def check_calibration(plan: ScoringPlan, calibration: CalibrationMap | None) -> None:
    """DataError when `calibration` was fitted on other weights than the plan's model."""
    if calibration is not None and calibration.model_fingerprint != plan.model_fingerprint:
        raise DataError(
            f"--calibration calibrates the model {calibration.model_fingerprint}, not the scoring model "
            f"{plan.model_fingerprint} ({plan.checkpoint}): a map is only valid for the weights it was fitted on"
        )


def calibration_source(calibration: CalibrationMap) -> dict:
    """What a calibrated quality file records of its calibration (QualitySource.calibration)."""
    return {
        "calibration_sha256": calibration.calibration_sha256,
        "fmr": calibration.fmr,
        "threshold": calibration.threshold,
        "matcher": calibration.matcher,
        "matcher_sha256": calibration.matcher_sha256,
    }


def finalize_scoring(
    out: Path, *, scored_now: int = 0, calibration: CalibrationMap | None = None
) -> ScoredDataset:
    """Join every shard's part into OUT/quality.parquet (manifest order), written last and atomically.

    `scored_now`: how many images the caller scored (reported back, for speeds); `calibration`: a
    map of this model, adding expected_fnmr and quality_score."""
    out = Path(out)
    plan = load_scoring_plan(out)
    check_calibration(plan, calibration)
    scoring_output(out).remove_temp_files()  # leftovers of killed part writers
    images = ScoringImages(Path(plan.dataset))
    try:
        quality = np.full(len(images), np.nan, dtype=np.float32)
        missing = []
        for shard in range(plan.num_shards):
            expected = images.rows_of_shard(shard)
            if not part_is_done(out, plan, shard, len(expected)):
                missing.append(shard)
                continue
            part = pq.read_table(_part_path(out, shard))
            rows = part.column("row").to_numpy()
            if not np.array_equal(rows, expected):
                missing.append(shard)
                continue
            quality[rows] = part.column("quality").to_numpy()
        if missing:
            raise DataError(
                f"{len(missing)} of {plan.num_shards} shards are not scored (first: {shard_stem(missing[0])}): "
                "run the scoring again to resume it",
                path=out,
            )
        columns = {"key": images.keys, "record": images.records, "label": images.labels, "quality": quality}
        if calibration is not None:
            columns["expected_fnmr"] = calibration.expected(quality).astype(np.float32)
            columns["quality_score"] = calibration.score(quality)
        table = pa.table(columns)
    finally:
        images.close()
    source = plan.quality_source()
    if calibration is not None:
        source = replace(source, calibration=calibration_source(calibration))
    write_quality_file(out / QUALITY_FILE, table, source)
    return ScoredDataset(out / QUALITY_FILE, plan, quality, scored_now)


def score_dataset(
    checkpoint: Path,
    dataset: Path,
    out: Path,
    *,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_threads: int = DEFAULT_THREADS,
    progress: bool = True,
    wait_lock: float = 0.0,
    calibration: CalibrationMap | None = None,
) -> ScoredDataset:
    """Plan, score every shard not scored yet and finalise, here, holding OUT's lock (`calibration`:
    see `finalize_scoring`; checked against the model before any image is scored)."""
    from pipeline.parallel.env import resolve_device

    torch_device = resolve_device(device)
    model, config = load_inference_model(checkpoint, torch_device)
    with (
        scoring_output(out).locked(wait=wait_lock),
        disk_full_is_a_data_error(Path(out), space=lambda: None, elsewhere="score into another --out"),
    ):
        plan = prepare_scoring(checkpoint, dataset, out, batch_size=batch_size, loaded=(model, config))
        check_calibration(plan, calibration)
        done = shards_done(out, plan)
        if done:
            log.info("resuming: %d of %d shards already scored (skipped)", len(done), plan.num_shards)
        scored = score_shards(
            out,
            range(plan.num_shards),
            device=torch_device,
            num_threads=num_threads,
            model=model,
            progress=progress,
        )
        info = load_dataset_info(Path(plan.dataset))
        return finalize_scoring(
            out, scored_now=sum(info.shards[s].count for s in scored), calibration=calibration
        )


def shards_done(out: Path, plan: ScoringPlan) -> list[int]:
    """The shards whose parts hold this plan's scores (row counts from dataset.json, read once)."""
    shards = load_dataset_info(Path(plan.dataset)).shards
    return [s for s, shard in enumerate(shards) if part_is_done(out, plan, s, shard.count)]
