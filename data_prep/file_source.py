"""Image-folder and list-file sources: which files a conversion takes, and their labels.

Besides RecordIO (data_prep.source) a conversion reads two layouts of single image files:

  ROOT/<identity>/<image>   one folder per identity, as WebFace42M and most people's data sets
                            come. Identity folders sorted by name (Python's string order, i.e.
                            Unicode code points) get labels 0..C-1; the files of each folder
                            are taken in name order. A folder gets a label when it holds at
                            least one file named *.jpg, *.jpeg or *.png (any case).
  LIST.lst                  a list of images, one per line, in one of the formats list makers
                            write (the first line with content decides, every line must follow it):
                              aligned<TAB>path<TAB>label[<TAB>bbox and landmarks]
                                  InsightFace's (src/data/dir2lst.py writes `1<TAB>path<TAB>label`,
                                  face2rec2.py reads it); only aligned faces (flag 1) are taken
                              index<TAB>label<TAB>path
                                  MXNet's im2rec (extra label columns before the path allowed)
                              path label
                                  two columns, separated by a tab or by the last run of spaces
                            Relative paths are resolved against the list's folder; labels are the
                            list's own (non-negative whole numbers; C = the largest + 1).

`list_source(path)` makes one pass over the folders (os.scandir, one listing per folder) or
over the list's lines. It returns a `FileList`: the entries' relative paths as one Arrow
string array and their labels in numpy arrays (memory grows with the number of files by the
bytes of their paths, not by Python objects per file), and `problems`: every entry that is
not a convertible image file, each with its path and why: a file whose name is not a JPEG
or PNG name, a folder inside an identity folder, an identity folder that cannot be listed or
holds no image, a malformed or duplicate list line. Nothing found is skipped silently: the
conversion refuses problems, or with --skip-bad lists each in dropped.parquet. Files
directly in ROOT (a README, a ground-truth table) belong to no identity: they are named in
`stray` and logged, not converted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from data_prep.errors import DataError

log = logging.getLogger(__name__)

FOLDER, LIST = "folder", "list"  # the `layout` of a conversion plan made from files
FILE_LAYOUTS = (FOLDER, LIST)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
LIST_SUFFIX = ".lst"
PATH_CHUNK = 1 << 16  # paths held as Python strings before they move into an Arrow array
MAX_LABEL = 2**31 - 1
LIST_FORMATS = {
    "insightface": "aligned<TAB>path<TAB>label (InsightFace)",
    "im2rec": "index<TAB>label<TAB>path (MXNet im2rec)",
    "plain": "path label",
}


@dataclass(frozen=True)
class FileProblem:
    """An entry of a file source that is not converted, and why."""

    path: str  # relative to the source's root (a folder ends in "/"), or as written in the list
    record: int  # the entry's record number (-1: not an entry of the list, e.g. a folder)
    reason: str


@dataclass(frozen=True)
class FileList:
    """The image files of a folder or list source, in conversion order, with their labels."""

    layout: str  # FOLDER | LIST
    source: Path  # ROOT, or the .lst file
    root: Path  # what relative paths are resolved against (ROOT, or the list's folder)
    paths: pa.LargeStringArray  # each entry's path, relative to `root` (a list's: as written)
    records: np.ndarray  # int64: each entry's record number (folder: its index; list: 0-based line)
    labels: np.ndarray  # int64
    num_classes: int
    identities: pa.LargeStringArray | None  # folder: the name of label i (None for a list)
    problems: tuple[FileProblem, ...] = ()
    stray: tuple[str, ...] = field(default=())  # files directly in ROOT: not converted

    def __len__(self) -> int:
        return len(self.records)

    def full_paths(self, start: int, stop: int) -> list[str]:
        """The paths to open of entries [start, stop)."""
        root = str(self.root)
        return [os.path.join(root, p) for p in self.paths[start:stop].to_pylist()]


def is_file_source(source: Path) -> bool:
    """Whether SOURCE is an image folder or a .lst list (else a RecordIO dataset folder or .rec).

    A folder holding a `*.rec` file is a RecordIO dataset; any other folder an image folder.
    """
    source = Path(source)
    if source.is_file():
        return source.suffix.lower() == LIST_SUFFIX
    if not source.is_dir():
        return False
    try:
        with os.scandir(source) as entries:
            return not any(e.name.endswith(".rec") and e.is_file() for e in entries)
    except OSError as exc:
        raise DataError(f"cannot list the folder: {exc.strerror}", path=source) from None


def list_source(source: Path, *, progress: bool = False) -> FileList:
    """The entries of an image folder or a .lst list (see the module docstring)."""
    source = Path(source)
    if source.is_dir():
        return _list_folder(source, progress=progress)
    if source.is_file() and source.suffix.lower() == LIST_SUFFIX:
        return _read_list(source, progress=progress)
    if not source.exists():
        raise DataError("does not exist", path=source)
    raise DataError("expected an image folder (ROOT/<identity>/<image>) or a .lst list", path=source)


class _PathColumn:
    """Strings gathered into one Arrow array (64-bit offsets), PATH_CHUNK at a time."""

    def __init__(self) -> None:
        self.chunks: list[pa.Array] = []
        self.pending: list[str] = []

    def append(self, value: str) -> None:
        self.pending.append(value)
        if len(self.pending) >= PATH_CHUNK:
            self.flush()

    def extend(self, values: list[str]) -> None:
        self.pending.extend(values)
        if len(self.pending) >= PATH_CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.chunks.append(pa.array(self.pending, pa.large_string()))
            self.pending = []

    def finish(self) -> pa.LargeStringArray:
        self.flush()
        return pa.concat_arrays(self.chunks) if self.chunks else pa.array([], pa.large_string())


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a byte the file system's encoding could not decode (surrogateescape)
        return False
    return True


def _scan_folder(folder: str) -> Iterator[os.DirEntry]:
    with os.scandir(folder) as entries:
        yield from entries


def _list_folder(root: Path, *, progress: bool) -> FileList:
    """ROOT/<identity>/<image>: one os.scandir per folder, identities and files in name order."""
    problems: list[FileProblem] = []
    folders = _PathColumn()
    stray: list[str] = []
    try:
        for entry in _scan_folder(str(root)):
            if not entry.is_dir():
                stray.append(entry.name)
            elif _utf8(entry.name):
                folders.append(entry.name)
            else:
                problems.append(
                    FileProblem(f"{entry.name!a}/", -1, "folder name is not valid UTF-8: rename it")
                )
    except OSError as exc:
        raise DataError(f"cannot list the folder: {exc.strerror}", path=root) from None
    names = folders.finish()
    if not len(names):
        raise DataError(
            "holds neither a RecordIO dataset (train.rec, or one *.rec) nor identity folders "
            "(an image folder is ROOT/<identity>/<image>, one folder per identity)",
            path=root,
        )
    names = names.take(pc.sort_indices(names))  # UTF-8 byte order = code point order
    paths = _PathColumn()
    identities = _PathColumn()
    counts: list[int] = []
    bar = tqdm(
        total=len(names), desc="list identity folders", unit="folder", disable=not progress, mininterval=1.0
    )
    for start in range(0, len(names), PATH_CHUNK):
        for name in names[start : start + PATH_CHUNK].to_pylist():
            bar.update()
            try:
                children = sorted(
                    (e.name, e.is_file(), e.is_dir()) for e in _scan_folder(os.path.join(root, name))
                )
            except OSError as exc:
                problems.append(
                    FileProblem(f"{name}/", -1, f"cannot list the identity folder: {exc.strerror}")
                )
                continue
            images = []
            for child, is_file, is_dir in children:
                path = f"{name}/{child}"
                if is_dir:
                    problems.append(
                        FileProblem(
                            f"{path}/",
                            -1,
                            "a folder inside an identity folder: images are read from ROOT/<identity>/ only",
                        )
                    )
                elif not is_file:
                    problems.append(FileProblem(path, -1, "not a regular file (a broken link?)"))
                elif os.path.splitext(child)[1].lower() not in IMAGE_SUFFIXES:
                    problems.append(
                        FileProblem(
                            path, -1, f"not a JPEG or PNG file name (*.jpg, *.jpeg, *.png): {child!r}"
                        )
                    )
                elif not _utf8(child):
                    problems.append(
                        FileProblem(f"{name}/{child!a}", -1, "file name is not valid UTF-8: rename it")
                    )
                else:
                    images.append(path)
            if not images:
                problems.append(
                    FileProblem(f"{name}/", -1, "identity folder holds no JPEG or PNG file: no label")
                )
                continue
            identities.append(name)
            counts.append(len(images))
            paths.extend(images)
    bar.close()
    num_classes = len(counts)
    if not num_classes:
        raise DataError(f"none of the {len(names)} identity folders holds a JPEG or PNG file", path=root)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), np.asarray(counts, dtype=np.int64))
    return FileList(
        layout=FOLDER,
        source=root,
        root=root,
        paths=paths.finish(),
        records=np.arange(len(labels), dtype=np.int64),
        labels=labels,
        num_classes=num_classes,
        identities=identities.finish(),
        problems=tuple(problems),
        stray=tuple(sorted(stray)),
    )


# ----------------------------------------------------------------------------- .lst lists


def _whole(text: str) -> int | None:
    """A non-negative whole number written as an integer or as a float ("3", "3.000000"), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not value.is_integer() or not 0 <= value <= MAX_LABEL:
        return None
    return int(value)


def _list_format(fields: list[str], line: str) -> str | None:
    """Which LIST_FORMATS a line follows (None: none)."""
    if len(fields) >= 3:
        if fields[0] in ("0", "1") and _whole(fields[2]) is not None:
            return "insightface"
        if _whole(fields[0]) is not None and _whole(fields[1]) is not None:
            return "im2rec"
        return None
    parts = fields if len(fields) == 2 else line.rsplit(None, 1)
    return "plain" if len(parts) == 2 and _whole(parts[1]) is not None else None


def _parse_line(line: str, kind: str) -> tuple[str, int] | str:
    """(path, label) of one list line in format `kind`, or why it cannot be read."""
    fields = line.split("\t")
    if kind == "insightface":
        if len(fields) < 3:
            return f"{len(fields)} tab-separated fields; expected {LIST_FORMATS[kind]}"
        if fields[0] != "1":
            return (
                f"aligned flag {fields[0]!r}: not an aligned face (InsightFace aligns those from landmarks "
                "when it packs them); convert aligned 112x112 faces"
            )
        path, label = fields[1], _whole(fields[2])
    elif kind == "im2rec":
        if len(fields) < 3:
            return f"{len(fields)} tab-separated fields; expected {LIST_FORMATS[kind]}"
        path, label = fields[-1], _whole(fields[1])
    else:
        parts = fields if len(fields) == 2 else line.rsplit(None, 1)
        if len(parts) != 2:
            return f"expected {LIST_FORMATS[kind]}"
        path, label = parts[0], _whole(parts[1])
    if label is None:
        return f"label is not a non-negative whole number; expected {LIST_FORMATS[kind]}"
    if not path.strip():
        return "empty path"
    if os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
        return f"not a JPEG or PNG file name (*.jpg, *.jpeg, *.png): {path!r}"
    if not _utf8(path):
        return "path is not valid UTF-8"
    return path, label


def _read_list(lst: Path, *, progress: bool) -> FileList:
    """A .lst file: one entry per line with content (record = its 0-based line number)."""
    kind: str | None = None
    problems: list[FileProblem] = []
    paths = _PathColumn()
    records: list[int] = []
    labels: list[int] = []
    try:
        handle = open(lst, "rb")  # noqa: SIM115 (closed below; lines decoded one by one)
    except OSError as exc:
        raise DataError(f"cannot read the list: {exc.strerror}", path=lst) from None
    with handle, tqdm(desc="read list", unit="line", disable=not progress, mininterval=1.0) as bar:
        for number, raw in enumerate(handle):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            bar.update()
            if not line.strip():
                continue
            if kind is None:
                kind = _list_format(line.split("\t"), line)
                if kind is None:
                    raise DataError(
                        f"line {number + 1} ({line[:80]!r}) is in none of the list formats read here: "
                        + "; ".join(LIST_FORMATS.values()),
                        path=lst,
                    )
            parsed = _parse_line(line, kind)
            if isinstance(parsed, str):
                problems.append(FileProblem(line[:200], number, f"line {number + 1}: {parsed}"))
                continue
            paths.append(parsed[0])
            records.append(number)
            labels.append(parsed[1])
    if kind is None:
        raise DataError("empty list: no lines with content", path=lst)
    path_array = paths.finish()
    record_array = np.asarray(records, dtype=np.int64)
    label_array = np.asarray(labels, dtype=np.int64)
    del records, labels
    keep = _first_listing(path_array, record_array, problems)
    if not keep.all():
        mask = pa.array(keep)
        path_array = path_array.filter(mask)
        record_array, label_array = record_array[keep], label_array[keep]
    if not len(record_array):
        raise DataError(f"none of the list's lines is usable (first: {problems[0].reason})", path=lst)
    return FileList(
        layout=LIST,
        source=lst,
        root=lst.parent,
        paths=path_array,
        records=record_array,
        labels=label_array,
        num_classes=int(label_array.max()) + 1,
        identities=None,
        problems=tuple(sorted(problems, key=lambda p: p.record)),
    )


def _first_listing(
    paths: pa.LargeStringArray, records: np.ndarray, problems: list[FileProblem]
) -> np.ndarray:
    """True for each entry but the repeats of a path listed before (each repeat becomes a problem)."""
    keep = np.ones(len(records), dtype=bool)
    if pc.count_distinct(paths).as_py() == len(records):
        return keep
    table = pa.table({"path": paths, "row": np.arange(len(records), dtype=np.int64)})
    grouped = table.group_by("path").aggregate([("row", "min"), ("row", "count")])
    repeated = grouped.filter(pc.greater(grouped["row_count"], 1))
    first = dict(zip(repeated["path"].to_pylist(), repeated["row_min"].to_pylist()))
    rows = np.flatnonzero(
        pc.is_in(paths, value_set=repeated["path"].combine_chunks()).to_numpy(zero_copy_only=False)
    )
    for row in rows.tolist():
        path = paths[row].as_py()
        if row != first[path]:
            keep[row] = False
            problems.append(
                FileProblem(
                    path,
                    int(records[row]),
                    f"line {records[row] + 1}: listed again (first at line {records[first[path]] + 1})",
                )
            )
    return keep
