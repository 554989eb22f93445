"""Benchmark `prep convert` of an image folder (ROOT/<identity>/<image>) at 100k, 300k (and 1M) files.

Builds (once, kept under --work) folders of N small files: 20 images per identity (WebFace42M
has ~21), each a tiny 112×112 JPEG of about 1 kB (a pool of distinct flat-colour images; real
aligned faces are 4-8 kB). Tiny files make the per-file costs (a directory entry, an open,
a stat, a read, a check, a hash, a tar member, a manifest row) the whole cost: that is what
must stay linear in the number of files.

Each phase runs in a fresh child process, so its peak memory is its own:
  scan      list the folder and read, check and hash every file (what planning does)
  convert   the whole conversion into a new folder (scan, plan, shards, finalize), 1 worker
  rerun     the same conversion again on the finished output (list, one stat per file, every
            shard verified and skipped, finalize)
`files_per_s` = N ÷ wall seconds; `rss_peak_mb` is the child's peak resident memory
(getrusage ru_maxrss: Python objects, numpy and Arrow buffers alike), `rss_base_mb` its
resident memory after the imports, `bytes_per_file` = (peak − base) ÷ N. The machine may be
shared: wall times are what they were, with the load average at the start of each phase.

Prints a table, then one JSON object as the last line (logs on stderr).

    .venv/bin/python benchmarks/folder_convert.py                  # 100k and 300k files
    .venv/bin/python benchmarks/folder_convert.py --full           # also 1M (≈ 5 GB of disk)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES_PER_IDENTITY = 20
POOL = 256  # distinct JPEGs the files cycle through
SIZES = (100_000, 300_000)
FULL_SIZE = 1_000_000
PHASES = ("scan", "convert", "rerun")


def tiny_jpegs(count: int) -> list[bytes]:
    """`count` distinct 112×112 JPEGs of about 1 kB (flat colours with a soft gradient)."""
    import numpy as np
    from PIL import Image

    images = []
    ramp = np.linspace(0, 24, 112, dtype=np.float32)
    for i in range(count):
        colour = np.array([(i * 37) % 200, (i * 91) % 200, (i * 53) % 200], dtype=np.float32)
        pixels = (colour[None, None, :] + ramp[:, None, None]).repeat(112, axis=1).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=60)
        images.append(buffer.getvalue())
    return images


def build_folder(root: Path, files: int) -> int:
    """ROOT/id-NNNNNNN/NN.jpg, `files` in all; reused when its stamp says it is complete. Its bytes."""
    stamp = root / "built.json"  # (directly in ROOT: the conversion names it and converts the rest)
    if stamp.is_file():
        return json.loads(stamp.read_text())["bytes"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    pool = tiny_jpegs(POOL)
    total = 0
    started = time.monotonic()
    for identity in range(-(-files // IMAGES_PER_IDENTITY)):
        folder = root / f"id-{identity:07d}"
        folder.mkdir()
        for n in range(min(IMAGES_PER_IDENTITY, files - identity * IMAGES_PER_IDENTITY)):
            data = pool[(identity * IMAGES_PER_IDENTITY + n) % POOL]
            fd = os.open(folder / f"{n:02d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
            total += len(data)
    stamp.write_text(json.dumps({"files": files, "bytes": total}))
    print(
        f"built {files} files ({total / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s", file=sys.stderr
    )
    return total


def child(phase: str, root: Path, out: Path) -> None:
    """One phase in this (child) process; prints one JSON line of its figures."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from data_prep.convert import convert
    from data_prep.file_scan import scan_files
    from data_prep.file_source import list_source

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    cpu = time.process_time()
    if phase == "scan":
        listing = list_source(root)
        scanned = scan_files(listing, size=112, threads=2)
        files = int(scanned.keep.sum())
    else:
        if phase == "convert":
            shutil.rmtree(out, ignore_errors=True)
        info = convert(root, out, samples_per_shard=5000, workers=1, progress=False)
        files = info.num_images
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "files": files,
                "seconds": seconds,
                "cpu_s": time.process_time() - cpu,
                "rss_base_mb": base / 1024,
                "rss_peak_mb": peak / 1024,
            }
        )
    )


def run_phase(phase: str, root: Path, out: Path) -> dict:
    load = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", phase, "--root", str(root), "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{phase} of {root} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["load_avg"] = load
    return figures


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=REPO / "work" / "bench" / "folder_convert")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), metavar="N")
    parser.add_argument("--full", action="store_true", help=f"also {FULL_SIZE} files (about 5 GB of disk)")
    parser.add_argument("--remove", action="store_true", help="delete each folder and output once measured")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.out)
        return 0
    sizes = sorted(set(args.sizes) | ({FULL_SIZE} if args.full else set()))
    rows = []
    for files in sizes:
        root, out = args.work / f"folder-{files}", args.work / f"converted-{files}"
        image_bytes = build_folder(root, files)
        for phase in PHASES:
            figures = run_phase(phase, root, out)
            row = {
                "files": files,
                "phase": phase,
                "seconds": round(figures["seconds"], 2),
                "files_per_s": round(files / figures["seconds"]),
                "cpu_s": round(figures["cpu_s"], 1),
                "rss_base_mb": round(figures["rss_base_mb"], 1),
                "rss_peak_mb": round(figures["rss_peak_mb"], 1),
                "bytes_per_file": round((figures["rss_peak_mb"] - figures["rss_base_mb"]) * 2**20 / files),
                "load_avg": round(figures["load_avg"], 1),
                "image_mb": round(image_bytes / 1e6, 1),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if args.remove:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    header = f"{'files':>9} {'phase':>8} {'seconds':>8} {'files/s':>8} {'CPU s':>7} {'peak RSS MB':>12} {'base MB':>8} {'B/file':>7} {'load':>5}"
    print(header)
    for r in rows:
        print(
            f"{r['files']:>9} {r['phase']:>8} {r['seconds']:>8.1f} {r['files_per_s']:>8} {r['cpu_s']:>7.1f} "
            f"{r['rss_peak_mb']:>12.1f} {r['rss_base_mb']:>8.1f} {r['bytes_per_file']:>7} {r['load_avg']:>5.1f}"
        )
    print(
        json.dumps({"bench": "folder_convert", "cpus": os.cpu_count(), "rows": rows, "git": git_revision()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
