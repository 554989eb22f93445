"""How `igfiqa erc` scales with the number of pairs: pair qualities and the whole evaluation.

200,000 scored images; 10^4, 10^5 and 10^6 random pairs (half mated). Times the
pair-quality lookup (`pair_qualities`) and the whole `evaluate_quality` (EDC + ERC at
two FMRs) at each size, medians of `--repeats` runs. The scaling exponent is the slope
of log(time) against log(pairs) between the smallest and largest size: 1 is linear,
2 quadratic.

Prints ONE JSON object as the last stdout line.

    .venv/bin/python benchmarks/erc_scaling.py [--images 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import pandas as pd

from pipeline.evaluation.comparisons import pair_qualities
from pipeline.evaluation.quality_metrics import evaluate_quality

SIZES = (10_000, 100_000, 1_000_000)


def _inputs(images: int, pairs: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    names = np.array([f"img/{i:07d}.jpg" for i in range(images)], dtype=object)
    scores = pd.DataFrame({"image": names, "ours": rng.normal(size=images)})
    table = pd.DataFrame(
        {
            "left": names[rng.integers(0, images, pairs)],
            "right": names[rng.integers(0, images, pairs)],
            "similarity": rng.normal(size=pairs),
            "mated": rng.random(pairs) < 0.5,
        }
    )
    return table, scores


def _median_seconds(action: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, object] = {"images": args.images}
    lookup, whole = {}, {}
    for size in SIZES:
        pairs, scores = _inputs(args.images, size, seed=size)
        lookup[size] = _median_seconds(lambda p=pairs, s=scores: pair_qualities(p, s, "ours"), args.repeats)
        whole[size] = _median_seconds(
            lambda p=pairs, s=scores: evaluate_quality(p, s, dataset="bench", fmrs=(1e-2, 1e-3)), args.repeats
        )
        print(
            f"{size:>9} pairs: lookup {lookup[size]:.3f} s, whole evaluation {whole[size]:.3f} s", flush=True
        )
    low, high = SIZES[0], SIZES[-1]
    span = math.log(high / low)
    result.update(
        {
            "pair_quality_s": {str(k): round(v, 4) for k, v in lookup.items()},
            "evaluate_s": {str(k): round(v, 4) for k, v in whole.items()},
            "pair_quality_scaling_exponent": round(math.log(lookup[high] / lookup[low]) / span, 3),
            "evaluate_scaling_exponent": round(math.log(whole[high] / whole[low]) / span, 3),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
