"""All-vs-all evaluation of an identity-labelled set: time and peak memory at 2k / 10k / 30k images.

Each size runs in a fresh process: N images of N/10 identities, 512-d embeddings (an identity
direction plus noise), one method's image quality. Timed separately: building the comparisons
(`all_pairs`: every dot product block by block, all mated pairs, the non-mated pairs or a hashed
sample of about the cap, default 10M) and evaluating them (`evaluate_comparisons`: thresholds at
FMR 1e-3 and 1e-4, EDC and the paper's ERC of the method, the random reference of 20 draws).
Peak memory is the process's peak resident set (ru_maxrss) and its growth over the resident set
before the comparisons were built (embeddings and imports included in the first, not the second).

Prints ONE JSON object as the last stdout line.

    .venv/bin/python benchmarks/all_vs_all.py [--sizes 2000 10000 30000] [--dim 512] [--cap 10000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_IDENTITY = 10


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(images: int, dim: int, cap: int) -> dict[str, object]:
    """One size, in this process."""
    from pipeline.evaluation.all_pairs import all_pairs
    from pipeline.evaluation.quality_metrics import evaluate_comparisons

    rng = np.random.default_rng(images)
    labels = np.repeat(np.arange(images // PER_IDENTITY), PER_IDENTITY)
    centres = rng.normal(size=(images // PER_IDENTITY, dim)).astype(np.float32)
    embeddings = centres[labels] + rng.normal(scale=1.5, size=(images, dim)).astype(np.float32)
    quality = rng.random(images)
    before = _rss_mb()
    started = time.perf_counter()
    pairs = all_pairs(embeddings, labels, nonmated_sample_cap=cap)
    built = time.perf_counter()
    evaluation = evaluate_comparisons(
        pairs.comparisons, {"model": quality}, dataset="bench", fmrs=(1e-3, 1e-4), random_draws=20
    )
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    c = pairs.comparisons
    return {
        "images": images,
        "pairs_evaluated": c.num_pairs,
        "mated": c.num_mated,
        "nonmated_total": pairs.nonmated_total,
        "nonmated_evaluated": c.num_nonmated,
        "sampled": pairs.sampled,
        "build_s": round(built - started, 2),
        "evaluate_s": round(done - built, 2),
        "total_s": round(done - started, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(before, 1),
        "peak_growth_mb": round(peak - before, 1),
        "fmrs": evaluation.fmrs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10_000, 30_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cap", type=int, default=10_000_000, help="non-mated sample cap (0: all)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.dim, args.cap)))
        return
    results = {}
    for size in args.sizes:
        child = [sys.executable, __file__, "--one", str(size), "--dim", str(args.dim), "--cap", str(args.cap)]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        results[str(size)] = json.loads(out.strip().splitlines()[-1])
        row = results[str(size)]
        print(
            f"{size:>6} images: {row['pairs_evaluated']:>10,} pairs, build {row['build_s']} s, "
            f"evaluate {row['evaluate_s']} s, peak RSS {row['peak_rss_mb']} MB (+{row['peak_growth_mb']})",
            file=sys.stderr,
            flush=True,
        )
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(json.dumps({"bench": "all_vs_all", "dim": args.dim, "cap": args.cap, "sizes": results, "git": git}))


if __name__ == "__main__":
    main()
