"""Does a trained model do its job? Its figures on FRESH synthetic verification sets.

    .venv/bin/python -m experiments.efficacy CHECKPOINT --seed 9001 [--work work/efficacy]

Generates (or reuses) clean.bin and mixed.bin of `--seed` (`data_prep.synth.synthesize_verification`:
identities never seen in training when the seed differs from the training data's), converts them
like `igfiqa prep bins`, and scores them with the checkpoint's own backbone and quality head through
`pipeline.evaluation.evaluate.evaluate_set` (10-fold accuracy, EDC at a fixed FMR), one forward
pass per image, or with `--flip` each image with its mirror image too (the demo's protocol). It prints:

- clean and mixed verification accuracy;
- Spearman's ρ between predicted quality and the known degradation strength on the mixed set
  (negative is right: stronger degradation, lower quality);
- the mixed set's EDC pAUC (FMR `--fmr`, discard <= `--discard-limit`) divided by the mean pAUC of
  `--permutations` random permutations of the same scores (below 1: quality ranks failures first);
- the same ratio for the oracle, quality = −strength, against the same random reference: how much
  quality CAN matter on this data (well below 1 when degraded images fail verification more often).

The last printed line is the JSON object of every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipeline.evaluation.efficacy import (
    DEFAULT_FMR,
    DEFAULT_IDENTITIES,
    DEFAULT_PAIRS,
    EFFICACY_OPTIONS,
    FreshSets,
    convert_sets,
    format_report,
    make_fresh_sets,
    measure_checkpoint,
)


def main(argv: list[str] | None = None) -> int:
    """Command line: measure one checkpoint on the fresh sets of one seed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (.ckpt)")
    parser.add_argument("--seed", type=int, required=True, help="seed of the fresh verification sets")
    parser.add_argument("--work", type=Path, default=Path("work/efficacy"), help="where the sets go")
    parser.add_argument("--synth", type=Path, help="take these clean.bin/mixed.bin (+ ground truth) instead")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs per set (fresh sets)")
    parser.add_argument("--identities", type=int, default=DEFAULT_IDENTITIES, help="identities (fresh sets)")
    parser.add_argument("--permutations", type=int, default=EFFICACY_OPTIONS.permutations)
    parser.add_argument("--fmr", type=float, default=DEFAULT_FMR)
    parser.add_argument("--discard-limit", type=float, default=EFFICACY_OPTIONS.discard_limit)
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=EFFICACY_OPTIONS.flip,
        help="score each image with its mirror image too: embeddings summed, quality averaged",
    )
    args = parser.parse_args(argv)
    if args.synth is not None:
        val = convert_sets(args.synth, args.work / f"converted-{args.synth.resolve().name}")
        sets = FreshSets(args.synth, val, args.seed)
    else:
        sets = make_fresh_sets(args.work, args.seed, pairs=args.pairs, identities=args.identities)
    options = dataclasses.replace(
        EFFICACY_OPTIONS,
        fmrs=(args.fmr,),
        discard_limit=args.discard_limit,
        permutations=args.permutations,
        flip=args.flip,
    )
    result = measure_checkpoint(args.checkpoint, sets, options)
    print(format_report(result))
    print(json.dumps(result.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
