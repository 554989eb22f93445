"""The reference matchers: independent face recognition models for cross-model evaluation, built once.

`build_matchers(spec, out)` (what `igfiqa matchers build` runs; the demo and the study call it
too) makes every matcher of a spec (`jobs.stages.matcher_spec`):

  data      OUT/synth, OUT/train: the matchers' synthetic training set (once for all of them)
  sets      OUT/sets/seed-<seed>/: clean.bin and mixed.bin of an unseen seed, converted
  train     OUT/runs/<name>-<recipe>/: FR-only training, here with N processes or on SLURM
            (`jobs.stages.train.train_stage`), logged by the trainer as an MLflow run, which is
            tagged igfiqa.role=matcher (the trainer tags its dataset_fingerprint)
  export    OUT/<name>.onnx: images → quality, embedding; checked against torch with onnxruntime
  measure   10-fold verification accuracy of the ONNX file on both sets (one forward pass)
  record    OUT/matchers.json, rewritten after each matcher

Built once, reused: a matcher whose record has the same recipe (`recipe_id`) and evaluation sets,
and whose ONNX file is there with the recorded SHA-256, is not touched. A changed recipe trains
that matcher again in a run directory of its own; an interrupted training resumes from its last
checkpoint; a lost or altered ONNX file is exported again from the recorded training. One build
writes into OUT at a time (a second waits for the first, then reuses what it built).

matchers.json: {"data": {...}, "evaluation": {...}, "matchers": [record, ...]}, each record
as `MatcherRecord` (its `onnx` path relative to the file's folder). `read_matchers(OUT)` reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from jobs.errors import UserError
from jobs.stages.matcher_spec import MatcherRecipe, MatchersSpec, matcher_config, recipe_id
from jobs.stages.work import StageRecord, WorkFolder, read_json_object, shown_path, write_json_atomically

if TYPE_CHECKING:
    from pipeline.evaluation.efficacy import FreshSets

MATCHERS_FILE = "matchers.json"
LABEL = "matcher"  # of the training marker: runs/<name>-<recipe>/matcher-train.json
ROLE_TAGS = {"igfiqa.role": "matcher"}
DEFAULT_OUT = Path("work/matchers")


@dataclass(frozen=True)
class MatcherLaunch:
    """Where matchers train: on the SLURM cluster of profile `cluster` (here instead when it cannot
    run, saying why), or here with `nproc` processes when `cluster` is None."""

    nproc: int = 2
    cluster: Path | None = None


@dataclass(frozen=True)
class MatcherRecord:
    """One built matcher, as matchers.json lists it."""

    name: str
    onnx: str  # relative to the folder of matchers.json
    sha256: str  # of the ONNX file
    backbone: str
    margin: str  # arcface | cosface
    margin_value: float  # loss.arc_margin (radians) or loss.cos_margin
    scale: float
    embedding_size: int
    seed: int
    epochs: int
    global_step: int
    data_fingerprint: str  # of the training set (the training run's dataset_fingerprint tag)
    clean_accuracy: float
    mixed_accuracy: float
    evaluation: dict[str, int]  # seed, pairs, identities of the sets the accuracies are measured on
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str
    recipe: str  # recipe_id: what decides the weights
    train_seconds: float  # wall time of the call that finished its training
    where: str  # where it trained
    config: dict[str, Any] = field(default_factory=dict)  # the resolved training config

    def onnx_path(self, folder: Path) -> Path:
        return Path(folder) / self.onnx

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Path) -> MatcherRecord:
        try:
            return cls(**values)
        except TypeError as exc:
            raise UserError(
                f"{source}: a matcher record does not fit this code ({exc}); build again"
            ) from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_matchers(out: Path = DEFAULT_OUT) -> list[MatcherRecord]:
    """The records of OUT/matchers.json ([] when there is none)."""
    path = Path(out) / MATCHERS_FILE
    return [MatcherRecord.from_dict(r, path) for r in _raw_records(path)]


def _raw_records(path: Path) -> list[dict[str, Any]]:
    content = read_json_object(path)
    if content is None:
        return []
    records = content.get("matchers")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: expected a list of records under 'matchers'; remove it to build again")
    return records


def _reusable_records(out: Path, say: Callable[[str], None]) -> dict[str, MatcherRecord]:
    """{name: record} of OUT/matchers.json; a record this code cannot read is left out (rebuilt)."""
    found = {}
    for raw in _raw_records(out / MATCHERS_FILE):
        try:
            record = MatcherRecord.from_dict(raw, out / MATCHERS_FILE)
        except UserError:
            say(f"  {raw.get('name', '?')}: its record is of another version of this code; building it again")
            continue
        found[record.name] = record
    return found


def matcher_onnx_paths(out: Path = DEFAULT_OUT) -> dict[str, Path]:
    """{name: absolute path of its ONNX file} of the matchers built in OUT (spec order)."""
    folder = Path(out).resolve()
    return {r.name: r.onnx_path(folder) for r in read_matchers(folder)}


def _is_current(record: MatcherRecord | None, recipe: str, evaluation: dict[str, int], out: Path) -> bool:
    """Whether `record` is of this recipe and these sets, and its ONNX file is the recorded one."""
    if record is None or record.recipe != recipe or record.evaluation != evaluation:
        return False
    path = record.onnx_path(out)
    return path.is_file() and sha256_file(path) == record.sha256


def _write_matchers(out: Path, spec: MatchersSpec, records: dict[str, MatcherRecord], data: dict) -> None:
    """matchers.json with the spec's matchers that have a record, in spec order (atomically); left
    untouched when it holds that already, so reusing a folder of matchers does not write to it."""
    listed = [asdict(records[name]) for name in spec.names() if name in records]
    content = {"data": data, "evaluation": asdict(spec.evaluation), "matchers": listed}
    if read_json_object(out / MATCHERS_FILE) == json.loads(json.dumps(content)):
        return
    write_json_atomically(out / MATCHERS_FILE, content)


def _prepare_data(paths: WorkFolder, spec: MatchersSpec, say: Callable[[str], None]) -> str:
    """Synthesize and convert the training set unless done; its dataset fingerprint."""
    from data_prep.dataset import dataset_fingerprint
    from jobs.stages.data import SynthSpec, prepare_training_set

    d = spec.data
    synth = SynthSpec(
        identities=d.identities,
        images_per_identity=d.images_per_identity,
        low_variance_fraction=d.low_variance_fraction,
        seed=d.seed,
    )
    prepare_training_set(paths, synth, say)
    return dataset_fingerprint(paths.train)


def _evaluation_sets(spec: MatchersSpec, root: Path) -> FreshSets:
    from pipeline.evaluation.efficacy import make_fresh_sets

    e = spec.evaluation
    return make_fresh_sets(root, e.seed, pairs=e.pairs, identities=e.identities, progress=True)


def _accuracies(onnx: Path, sets: FreshSets) -> dict[str, float]:
    """{"clean": accuracy, "mixed": accuracy} of the ONNX file on the sets (one forward pass per image)."""
    from pipeline.evaluation.embeddings import OnnxEmbedder
    from pipeline.evaluation.evaluate import load_verification_set, matcher_verification

    embedder = OnnxEmbedder(onnx, providers=["CPUExecutionProvider"])
    return {
        name: matcher_verification(embedder, load_verification_set(sets.val / name), progress=True).accuracy
        for name in ("clean", "mixed")
    }


def _tag_run(
    tracking_uri: str, run_id: str, tags: dict[str, Any], metrics: dict[str, float], step: int
) -> None:
    """The matcher's tags and accuracies on its training run (a tracking failure costs a warning)."""
    import logging

    from pipeline.tracking.store import RunTracker

    try:
        tracker = RunTracker(tracking_uri, run_id)
        tracker.set_tags(tags)
        tracker.log_metrics(metrics, step=step)
    except Exception as exc:  # tracking never undoes a built matcher
        logging.getLogger(__name__).warning("MLflow tags of matcher run %s not written: %s", run_id, exc)


def _build_one(
    recipe: MatcherRecipe,
    spec: MatchersSpec,
    paths: WorkFolder,
    *,
    recipe_hash: str,
    fingerprint: str,
    sets: FreshSets,
    launch: MatcherLaunch,
    say: Callable[[str], None],
    job_log: TextIO,
) -> MatcherRecord:
    """Train (or reuse the training of) one matcher, export it, measure it; its record."""
    from jobs.evaluation import export_checked_onnx
    from jobs.stages.train import train_stage
    from pipeline.config import config_to_dict

    out = paths.out
    run_dir = out / "runs" / f"{recipe.name}-{recipe_hash}"
    config = matcher_config(spec, recipe, train=paths.train, run_dir=run_dir, tracking_uri=paths.tracking_uri)
    record = StageRecord(recipe.name)
    trained = train_stage(
        config,
        record,
        label=LABEL,
        nproc=launch.nproc,
        here_because="no cluster profile was given (--submit)" if launch.cluster is None else None,
        cluster=launch.cluster,
        say=say,
        job_log=job_log,
    )
    say(f"  {recipe.name}: trained ({record.note})")
    onnx = out / f"{recipe.name}.onnx"
    export_checked_onnx(
        Path(trained.checkpoint), onnx, with_embedding=True, opset=18, exporter="auto", tolerance=1e-3
    )
    accuracy = _accuracies(onnx, sets)
    loss = config.loss
    built = MatcherRecord(
        name=recipe.name,
        onnx=onnx.name,
        sha256=sha256_file(onnx),
        backbone=config.model.backbone,
        margin=loss.margin,
        margin_value=loss.arc_margin if loss.margin == "arcface" else loss.cos_margin,
        scale=loss.scale,
        embedding_size=config.model.embedding_size,
        seed=recipe.seed,
        epochs=config.optim.epochs,
        global_step=trained.global_step,
        data_fingerprint=fingerprint,
        clean_accuracy=accuracy["clean"],
        mixed_accuracy=accuracy["mixed"],
        evaluation=asdict(spec.evaluation),
        mlflow_run_id=trained.mlflow_run_id,
        tracking_uri=config.run.tracking_uri,
        checkpoint=trained.checkpoint,
        recipe=recipe_hash,
        train_seconds=trained.seconds,
        where=trained.where,
        config=config_to_dict(config),
    )
    if trained.mlflow_run_id and config.run.tracking_uri != "off":
        tags = {
            **ROLE_TAGS,
            "igfiqa.matcher": recipe.name,
            "igfiqa.matcher_recipe": recipe_hash,
            "onnx": str(onnx),
            "onnx_sha256": built.sha256,
            "evaluation_seed": spec.evaluation.seed,
        }
        metrics = {
            "matcher.clean_accuracy": built.clean_accuracy,
            "matcher.mixed_accuracy": built.mixed_accuracy,
        }
        _tag_run(config.run.tracking_uri, trained.mlflow_run_id, tags, metrics, trained.global_step)
    return built


def build_matchers(
    spec: MatchersSpec,
    out: Path = DEFAULT_OUT,
    *,
    only: list[str] | tuple[str, ...] | None = None,
    launch: MatcherLaunch | None = None,
    sets_root: Path | None = None,
    say: Callable[[str], None] = print,
    job_log: TextIO = sys.stdout,
) -> list[MatcherRecord]:
    """Build (or reuse) the spec's matchers in OUT, those named in `only` when given; their records.

    `sets_root`: where the evaluation sets are made or found (default OUT/sets). See the module
    docstring for what is reused.
    """
    from data_prep.lock import OutputLock

    launch = launch or MatcherLaunch()
    if launch.nproc < 1:
        raise UserError(f"--nproc {launch.nproc}: need at least one process")
    selected = spec.select(only)
    paths = WorkFolder(out)
    if paths.out.exists() and not paths.out.is_dir():
        raise UserError(f"--out {paths.out} exists and is not a folder")
    with OutputLock(paths.out, wait=math.inf):
        existing = _reusable_records(paths.out, say)
        records = {name: r for name, r in existing.items() if name in spec.names()}
        dropped = sorted(set(existing) - set(records))
        if dropped:
            say(f"  no longer in the spec, left out of {MATCHERS_FILE}: {', '.join(dropped)}")
        say(
            f"matchers' training data ({spec.data.identities} identities, seed {spec.data.seed}) in {shown_path(paths.out)}"
        )
        fingerprint = _prepare_data(paths, spec, say)
        data = {**asdict(spec.data), "dataset": str(paths.train), "fingerprint": fingerprint}
        sets = _evaluation_sets(spec, Path(sets_root) if sets_root else paths.out / "sets")
        evaluation = asdict(spec.evaluation)
        for recipe in selected:
            probe = matcher_config(
                spec, recipe, train=paths.train, run_dir=paths.out, tracking_uri=paths.tracking_uri
            )
            recipe_hash = recipe_id(probe, fingerprint)
            if _is_current(records.get(recipe.name), recipe_hash, evaluation, paths.out):
                say(
                    f"  {recipe.name}: built before, reused ({shown_path(records[recipe.name].onnx_path(paths.out))})"
                )
                continue
            say(
                f"  {recipe.name}: building ({probe.model.backbone}, {probe.loss.margin}, {probe.optim.epochs} epochs)"
            )
            records[recipe.name] = _build_one(
                recipe,
                spec,
                paths,
                recipe_hash=recipe_hash,
                fingerprint=fingerprint,
                sets=sets,
                launch=launch,
                say=say,
                job_log=job_log,
            )
            _write_matchers(paths.out, spec, records, data)
        _write_matchers(paths.out, spec, records, data)
    return [records[m.name] for m in selected]


def _current_without_lock(spec: MatchersSpec, out: Path, name: str) -> MatcherRecord | None:
    """NAME's record in OUT/matchers.json when it is current for `spec` (same training data settings,
    recipe and evaluation sets, the ONNX file's recorded SHA-256), read without the lock; None when
    not, or in doubt (then `build_matchers` decides under the lock)."""
    try:
        content = read_json_object(out / MATCHERS_FILE)
        records = {r.name: r for r in read_matchers(out)}
    except UserError:
        return None
    data = (content or {}).get("data")
    if not isinstance(data, dict) or not data.get("fingerprint") or name not in records:
        return None
    if any(data.get(key) != value for key, value in asdict(spec.data).items()):
        return None
    paths = WorkFolder(out)
    (recipe,) = spec.select([name])
    probe = matcher_config(
        spec, recipe, train=paths.train, run_dir=paths.out, tracking_uri=paths.tracking_uri
    )
    recipe_hash = recipe_id(probe, str(data["fingerprint"]))
    record = records[name]
    return record if _is_current(record, recipe_hash, asdict(spec.evaluation), paths.out) else None


def matcher_stage(
    spec: MatchersSpec,
    out: Path,
    name: str,
    record: StageRecord,
    *,
    launch: MatcherLaunch,
    sets_root: Path | None = None,
    say: Callable[[str], None] = print,
    job_log: TextIO = sys.stdout,
) -> MatcherRecord:
    """The spec's matcher NAME built into OUT, or reused (`build_matchers`); its record, with the
    stage's note saying which, and where it trained. A current record is reused without taking
    OUT's lock, so a build of other matchers there (a study's) is not waited for."""
    built = _current_without_lock(spec, Path(out), name)
    if built is not None:
        say(f"  {name}: built before, reused ({shown_path(built.onnx_path(Path(out)))})")
        before = built
    else:
        before = {r.name: r for r in read_matchers(out)}.get(name)
        (built,) = build_matchers(
            spec, out, only=[name], launch=launch, sets_root=sets_root, say=say, job_log=job_log
        )
    record.reused = built == before
    how = "built before, reused" if record.reused else f"built ({built.global_step} steps {built.where})"
    record.note = (
        f"{name} {how}: {shown_path(built.onnx_path(Path(out)))}, verification accuracy "
        f"clean {100 * built.clean_accuracy:.2f} % / mixed {100 * built.mixed_accuracy:.2f} %"
    )
    return built


# ----------------------------------------------------------------------------- printing


def matchers_table(records: list[MatcherRecord], out: Path) -> str:
    """The records as an aligned text table (what `igfiqa matchers list` prints)."""
    if not records:
        return f"no matchers in {Path(out) / MATCHERS_FILE} (build them with `igfiqa matchers build`)"
    header = ("name", "backbone", "margin", "dim", "seed", "steps", "clean %", "mixed %", "train s", "onnx")
    rows = [
        (
            r.name,
            r.backbone,
            f"{r.margin} {r.margin_value:g}",
            str(r.embedding_size),
            str(r.seed),
            str(r.global_step),
            f"{100 * r.clean_accuracy:.2f}",
            f"{100 * r.mixed_accuracy:.2f}",
            f"{r.train_seconds:.0f}",
            shown_path(r.onnx_path(Path(out).resolve())),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    first = records[0]
    lines.append(
        f"accuracy: 10-fold verification, one forward pass, on clean.bin / mixed.bin of seed "
        f"{first.evaluation.get('seed')} ({first.evaluation.get('pairs')} pairs each)"
    )
    return "\n".join(lines)
