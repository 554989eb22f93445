"""A working folder's layout, the records and clock of its stages, and the stages' marker files."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import UserError

PREVIEW_NAME = "augmentation_preview.png"


@dataclass(frozen=True)
class WorkFolder:
    """Where every stage writes, all under `out` (made absolute: jobs run in other directories).

    synth/ the synthetic dataset, train/ its training shards, val/ the verification sets,
    run/ the training run, eval/ its evaluation, mlflow.db the MLflow store.
    """

    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out).resolve())

    @property
    def synth(self) -> Path:
        return self.out / "synth"

    @property
    def train(self) -> Path:
        return self.out / "train"

    @property
    def val(self) -> Path:
        return self.out / "val"

    @property
    def preview(self) -> Path:
        return self.out / PREVIEW_NAME

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"


def marker_name(label: str, stage: str) -> str:
    """The marker file a finished stage leaves, e.g. `demo-train.json` (label "demo", stage "train")."""
    return f"{label}-{stage}.json"


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when absent; a broken file is a clear error."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); remove it to redo that stage") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; remove it to redo that stage")
    return value


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    """Write the marker atomically: a killed write leaves the old marker or none."""
    from data_prep.atomic import atomic_write_json

    atomic_write_json(path, value)


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class StageRecord:
    """One stage's name, wall time and whether an earlier run's result was reused."""

    name: str
    seconds: float = 0.0
    reused: bool = False
    note: str = ""


@dataclass
class StageClock:
    """Numbered stage headers (`[demo 1/7] synth: ...`), per-stage timing and a timing table."""

    label: str
    total: int
    say: Callable[[str], None]
    records: list[StageRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageRecord]:
        """Announce the stage, time it, and report how it ended (reused or done)."""
        record = StageRecord(name)
        self.records.append(record)
        number = f"[{self.label} {len(self.records)}/{self.total}]"
        self.say(f"{number} {name}: {what}")
        start = time.monotonic()
        try:
            yield record
        except BaseException:
            self.say(f"{number} {name}: FAILED after {time.monotonic() - start:.1f} s")
            raise
        record.seconds = time.monotonic() - start
        outcome = "reused" if record.reused else "done"
        note = f" ({record.note})" if record.note else ""
        self.say(f"{number} {name}: {outcome} in {record.seconds:.1f} s{note}")

    def table(self) -> str:
        """Stage timings, one line each, and the total."""
        lines = [
            f"  {r.name:<10} {r.seconds:7.1f} s  {'reused' if r.reused else 'ran'}" for r in self.records
        ]
        lines.append(f"  {'total':<10} {time.monotonic() - self.started:7.1f} s")
        return "\n".join(lines)
