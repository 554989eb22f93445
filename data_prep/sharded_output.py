"""A folder of shards written atomically, resumably, under a lock, finished by one file written last.

Conversion (data_prep.convert), the curation filter (data_prep.curate) and curation scoring
(pipeline.curation.scoring) write their output folder the same way:

    OUT/shards/shard-NNNNN.tar, .idx   each written under a temp name, then renamed (data_prep.atomic)
    OUT/.prep/lock                      held while a run writes into OUT (data_prep.lock)
    OUT/.prep/PLAN                      what the run writes, with its `plan_id` (the scoring keeps
                                        its plan and parts in OUT/.score/)
    OUT/.prep/shard-NNNNN.parquet       a shard's manifest part, then
    OUT/.prep/shard-NNNNN.json          its done record: plan id, count, size and XXH3-128 of its files
    OUT/dataset.json                    (the scoring: quality.parquet) written last: present = complete

A shard is done when its done record carries the plan's id and count and its files still
match it (the tar's size; with `verify`, both files' checksums), so a run killed at any point
and started again skips the finished shards and ends byte-identical. A folder holding another
plan, or files of its own, is refused before anything is written.

`ShardedOutput(out, plan_file=...)` holds these paths and rules. `disk_full_is_a_data_error`
and `check_free_space` turn a full disk into one message saying what to do; `run_shards`
writes shards in a pool and stops starting new ones after a failure or Ctrl-C.

Fault injection, for tests: with `IGFIQA_FAULT=after-shard:N:SIGNAL` in the environment
(SIGNAL: KILL, INT, TERM), the process that finishes shard N (its done record, or the
scoring's part, written) sends itself SIGNAL right after; INT goes to its whole process
group, as Ctrl-C in a terminal does. Unset, `fault_point` costs one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.atomic import atomic_write, atomic_write_json, canonical_json, remove_temp_files_in
from data_prep.checksums import xxh128_file
from data_prep.dataset import DATASET_FILE, SHARDS_DIR, DatasetInfo, ShardInfo, load_dataset_info
from data_prep.errors import DataError
from data_prep.lock import LOCK_DIR, OutputLock
from data_prep.manifest import TRAIN_MANIFEST_SCHEMA, write_table
from data_prep.shards import WrittenShard, shard_stem

PREP_DIR = LOCK_DIR  # OUT/.prep: the plan, the shards' manifest parts and done records, the lock
FAULT_ENV = "IGFIQA_FAULT"
TEMP_MARK = ".tmp-"  # in the name of every file data_prep.atomic has not renamed into place yet
MIN_KEY_WIDTH = 9


@dataclass(frozen=True)
class ShardPaths:
    """The files of one shard: tar and DALI index in shards/, manifest part and done record in .prep/."""

    tar: Path
    index: Path
    manifest: Path
    done: Path


class ShardedOutput:
    """The output folder of a stage that writes shards (see the module docstring).

    `plan_file`: the plan's name in the bookkeeping folder `bookkeeping` (OUT/.prep by default).
    """

    def __init__(self, root: Path, *, plan_file: str, bookkeeping: str = PREP_DIR) -> None:
        self.root = Path(root)
        self.prep = self.root / bookkeeping
        self.plan_path = self.prep / plan_file
        self.shards_dir = self.root / SHARDS_DIR

    # ------------------------------------------------------------------ the folder and its plan

    def exists(self) -> bool:
        """Whether OUT exists; DataError when it is something other than a folder."""
        if self.root.exists() and not self.root.is_dir():
            raise DataError("output path exists and is not a folder", path=self.root)
        return self.root.exists()

    def has_plan(self) -> bool:
        return self.plan_path.is_file()

    def read_plan(self, *, missing: str) -> dict[str, Any]:
        """The plan file's JSON object; DataError `missing` (naming OUT) when there is none."""
        if not self.has_plan():
            raise DataError(missing, path=self.root)
        try:
            raw = json.loads(self.plan_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"malformed plan: {exc!r}", path=self.plan_path) from None
        if not isinstance(raw, dict):
            raise DataError("malformed plan: not a JSON object", path=self.plan_path)
        return raw

    def plan_id(self) -> str | None:
        """The `plan_id` of the plan in OUT: None when there is no plan, "" when it is unreadable."""
        if not self.has_plan():
            return None
        try:
            return str(self.read_plan(missing="").get("plan_id", ""))
        except DataError:
            return ""

    def write_plan(self, plan: dict[str, Any]) -> None:
        """Write the plan (canonical JSON, atomically and durably); creates the folders it needs."""
        self.create()
        atomic_write_json(self.plan_path, plan)

    def refuse_another_plan(self, plan_id: str, *, holds: str) -> bool:
        """True when OUT holds plan `plan_id` (a run to resume), False when it holds no plan;
        DataError "holds {holds}" for another plan."""
        existing = self.plan_id()
        if existing is not None and existing != plan_id:
            raise DataError(f"holds {holds}", path=self.root)
        return existing is not None

    def refuse_foreign(self, *, writing: str, own: Iterable[str] = (), resuming: bool = False) -> None:
        """DataError when OUT holds anything but its bookkeeping folders, shards/ and `own` (and,
        when `resuming`, temp files of killed writers): nothing is written into another's folder."""
        allowed = {LOCK_DIR, self.prep.name, SHARDS_DIR, *own}
        foreign = sorted(
            p.name
            for p in self.root.iterdir()
            if p.name not in allowed and not (resuming and TEMP_MARK in p.name)
        )
        if foreign:
            raise DataError(
                f"exists and is not empty (holds {', '.join(foreign[:5])}): refusing to write {writing} "
                "into it; choose a new or empty --out",
                path=self.root,
            )

    def holds_files(self, *, besides: Iterable[str] = ()) -> bool:
        """Whether the bookkeeping folder holds files other than the lock and `besides`, or shards/
        anything: an unfinished run of another stage, or of another plan."""
        ignored = {"lock", *besides}
        if self.prep.is_dir() and any(p.name not in ignored for p in self.prep.iterdir()):
            return True
        return self.shards_dir.is_dir() and any(self.shards_dir.iterdir())

    def create(self) -> None:
        """Create the bookkeeping folder (and OUT)."""
        self.prep.mkdir(parents=True, exist_ok=True)

    def create_shards_dir(self) -> None:
        self.create()
        self.shards_dir.mkdir(exist_ok=True)

    def remove_temp_files(self) -> None:
        """Delete the temp files killed writers left in OUT, shards/ and the bookkeeping folder.

        Only call it while no writer runs there (under the lock, before or after the shards)."""
        for folder in (self.root, self.shards_dir, self.prep):
            if folder.is_dir():
                remove_temp_files_in(folder)

    @contextlib.contextmanager
    def locked(self, *, wait: float = 0.0) -> Iterator[None]:
        """Hold OUT's lock (data_prep.lock) around a run; when the body fails before the plan is
        written, remove the folders it created, so OUT is left as it was."""
        folders = dict.fromkeys((self.root, self.root / LOCK_DIR, self.prep, self.shards_dir))
        created = [p for p in folders if not p.exists()]
        lock = OutputLock(self.root, wait=wait)
        lock.acquire()
        try:
            yield
        except BaseException:
            if not self.has_plan():  # nothing worth keeping
                lock.release(remove=self.root / LOCK_DIR in created)
                for folder in reversed(created):
                    with contextlib.suppress(OSError):  # not empty, or never made: leave it
                        folder.rmdir()
            raise
        finally:
            lock.release()

    # ------------------------------------------------------------------ shards

    def shard_paths(self, shard: int) -> ShardPaths:
        stem = shard_stem(shard)
        return ShardPaths(
            tar=self.shards_dir / f"{stem}.tar",
            index=self.shards_dir / f"{stem}.idx",
            manifest=self.prep / f"{stem}.parquet",
            done=self.prep / f"{stem}.json",
        )

    def done_record(self, shard: int, *, plan_id: str, count: int, verify: bool) -> dict[str, Any] | None:
        """The done record of shard `shard` when it is finished for this plan and its files still
        match it (the tar's size; with `verify` the tar's and the index's XXH3-128), else None."""
        paths = self.shard_paths(shard)
        try:
            done = json.loads(paths.done.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(done, dict) or done.get("plan_id") != plan_id or done.get("count") != count:
            return None
        if not all(p.is_file() for p in (paths.tar, paths.index, paths.manifest)):
            return None
        if paths.tar.stat().st_size != done.get("size"):
            return None
        if verify and (
            xxh128_file(paths.tar) != done.get("xxh128")
            or xxh128_file(paths.index) != done.get("index_xxh128")
        ):
            return None
        return done

    def begin_shard(self, shard: int) -> ShardPaths:
        """Forget shard `shard`'s done record before its files are written again; its paths."""
        paths = self.shard_paths(shard)
        paths.done.unlink(missing_ok=True)
        return paths

    def finish_shard(self, shard: int, *, plan_id: str, written: WrittenShard, manifest: pa.Table) -> None:
        """After the shard's tar and index: its manifest part, then its done record (both atomic)."""
        paths = self.shard_paths(shard)
        write_table(paths.manifest, manifest, durable=False)
        done = {
            "plan_id": plan_id,
            "count": written.count,
            "size": written.size,
            "xxh128": written.xxh128,
            "index_xxh128": written.index_xxh128,
        }
        atomic_write(paths.done, lambda tmp: tmp.write_bytes(canonical_json(done)), durable=False)
        fault_point(shard)

    def finished_shards(
        self, *, plan_id: str, counts: Sequence[int], verify: bool, stage: str
    ) -> tuple[ShardInfo, ...]:
        """dataset.json's entry of every shard (`counts[i]` samples in shard i); DataError naming
        the first shard that is not finished for this plan (run the `stage` again to resume)."""
        shards, missing = [], []
        for shard, count in enumerate(counts):
            done = self.done_record(shard, plan_id=plan_id, count=count, verify=verify)
            if done is None:
                missing.append(shard)
                continue
            paths = self.shard_paths(shard)
            shards.append(
                ShardInfo(
                    tar=paths.tar.relative_to(self.root).as_posix(),
                    index=paths.index.relative_to(self.root).as_posix(),
                    count=done["count"],
                    xxh128=done["xxh128"],
                )
            )
        if missing:
            raise DataError(
                f"{len(missing)} of {len(counts)} shards are not written or do not verify "
                f"(first: {shard_stem(missing[0])}): run the {stage} again to resume it",
                path=self.root,
            )
        return tuple(shards)

    def manifest(self, num_shards: int, *, schema: pa.Schema = TRAIN_MANIFEST_SCHEMA) -> pa.Table:
        """The shards' manifest parts joined in shard order (as `schema`)."""
        parts = [pq.read_table(self.shard_paths(i).manifest) for i in range(num_shards)]
        return pa.concat_tables(parts).cast(schema)

    def write_dataset(self, info: DatasetInfo) -> DatasetInfo:
        """Write dataset.json, last and atomically (its presence means complete); the dataset read back."""
        atomic_write_json(self.root / DATASET_FILE, info.to_json_dict())
        return load_dataset_info(self.root)


def sample_keys(positions: Iterable[int], num_images: int) -> list[str]:
    """The keys of the samples at `positions` of a dataset of `num_images`: the zero-padded position
    in the dataset's shuffled order (at least MIN_KEY_WIDTH digits)."""
    width = max(MIN_KEY_WIDTH, len(str(num_images - 1)))
    return [f"{position:0{width}d}" for position in positions]


def run_shards(
    pool: Executor, task: Callable[[int], object], shards: Iterable[int], on_done: Callable[[int], object]
) -> None:
    """`task(i)` for every shard i in `pool` (closed afterwards), `on_done(i)` as each finishes;
    after a failure or Ctrl-C no shard that has not started yet is started."""
    with pool:
        futures = {pool.submit(task, i): i for i in shards}
        try:
            for future in as_completed(futures):
                future.result()
                on_done(futures[future])
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def fault_point(shard: int) -> None:
    """Tests only: send the signal `IGFIQA_FAULT=after-shard:N:SIGNAL` names once shard N is finished."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, index, name = spec.split(":")
    if point != "after-shard" or int(index) != shard:
        return
    signum = signal.Signals[f"SIG{name}"]
    if signum == signal.SIGINT:
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)


# ----------------------------------------------------------------------------- a full disk


def human_bytes(nbytes: float) -> str:
    """`512 B`, `1.5 kB`, `3.2 GB` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def free_bytes(out: Path) -> int | None:
    """Free bytes on OUT's filesystem (its parent's while OUT does not exist); None when unknown."""
    out = Path(out)
    try:
        return shutil.disk_usage(out if out.exists() else out.parent).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_full_is_a_data_error(
    out: Path, *, space: Callable[[], str | None], elsewhere: str
) -> Iterator[None]:
    """Turn a full disk (ENOSPC) or an exceeded quota (EDQUOT) into one DataError naming OUT, the
    space still needed (`space()`, a clause such as "the conversion needs about 3 GB more there",
    None when unknown) and the free space; `elsewhere` is the other way out ("convert into another --out")."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, DataError):
            raise
        what = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
        free = free_bytes(out)
        parts = [p for p in (space(), None if free is None else f"{human_bytes(free)} are free") if p]
        raise DataError(
            f"{what} while writing {exc.filename or 'into it'}: {', '.join(parts)}. Free some space (or "
            f"{elsewhere}), then run the same command again: it resumes, keeping the finished shards",
            path=out,
        ) from None


def check_free_space(out: Path, needed: int | None, *, elsewhere: str) -> None:
    """Refuse before writing shards when OUT's filesystem clearly lacks the `needed` bytes."""
    free = free_bytes(out)
    if needed is not None and free is not None and needed > free:
        raise DataError(
            f"not enough free space: the shards need about {human_bytes(needed)} more, but only "
            f"{human_bytes(free)} are free there. Free some space (or {elsewhere}), then run the "
            "same command again",
            path=out,
        )
