"""`igfiqa calibrate`: give a model's quality a meaning, the expected FNMR of an image at an FMR.

Argument parsing and printing; the work is `jobs.evaluation.calibrate_checkpoint`
(pipeline.evaluation.calibration_run and .calibration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CALIBRATE_DESCRIPTION = """\
Fit a monotone map from the checkpoint's raw quality to the EXPECTED FNMR of an image: the
fraction of its mated comparisons (with the other images of its identity, by the matcher
--fr-model) that fail at the threshold fixed at --fmr on the non-mated comparisons of the
sets. A mated pair counts for both its images, so an image's value is the mean over its mated
pairs and every curve piece, bin and error is weighted by mated comparisons.

  data       identity-labelled sets (`igfiqa prep convert` of a RecordIO dataset or an image
             folder ROOT/<identity>/*.jpg, e.g. from `igfiqa prep synth --identity-set`), all
             comparisons of each set (non-mated pairs capped as in `igfiqa eval`); one threshold
             on the non-mated comparisons of all the sets together
  split      by IDENTITY, seeded: --holdout of the identities are held out of the fit
  fit        isotonic regression (non-increasing) on the other identities, weighted by mated
             comparisons; linear between its knots, constant beyond
  bands      --bootstrap refits on identities resampled with replacement (95%)
  check      per quality decile of the held-out identities, predicted vs observed FNMR and
             the expected calibration error ECE (mean |predicted - observed|, weighted by
             mated comparisons)

Refused: a set without identity labels (a verification set), an FMR the non-mated comparisons
do not resolve (FMR x non-mated < 10), a matcher or a set that cannot be read.

OUT gets calibration.json (the map; the matcher's SHA-256 and the sets' fingerprints; the model's
fingerprint; FMR and threshold; images and comparisons behind each piece of the curve; the
bands; the held-out reliability table and ECE) and reliability.png. The map belongs to this
model's weights: `igfiqa score`, `igfiqa curate score` and `igfiqa export` take it with
--calibration (refused for another model) and add expected_fnmr and the 0-100 quality_score
(25 points per factor of ten in FNMR: 100 = FNMR <= 1e-4, 75 = 1e-3, 50 = 1%, 25 = 10%).

examples (the demo's set of an unseen seed; the exported model of the typical flow as matcher):
  igfiqa calibrate runs/tiny-cpu/checkpoints/last.ckpt --data work/eval/seed-1000000-conv --fr-model quality.onnx --fmr 1e-3 --bootstrap 50 --out work/calibration
  igfiqa score runs/tiny-cpu/checkpoints/last.ckpt photos/ --calibration work/calibration/calibration.json --format ofiq-csv --out scores-ofiq.csv
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `igfiqa calibrate` to the top-level parser."""
    calibrate = subparsers.add_parser(
        "calibrate",
        help="map raw quality to expected FNMR at an FMR (calibration.json)",
        description=CALIBRATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument("checkpoint", type=Path, help="training checkpoint (.ckpt)")
    calibrate.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        metavar="SETS",
        help="identity-labelled converted sets, or folders of them",
    )
    calibrate.add_argument(
        "--fr-model", type=Path, required=True, metavar="MATCHER.onnx", help="the ONNX face recognition model"
    )
    calibrate.add_argument(
        "--fr-bgr", action="store_true", help="the ONNX FR model expects BGR channel order"
    )
    calibrate.add_argument("--fmr", type=float, default=1e-3, help="FMR of the threshold (default: 1e-3)")
    calibrate.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: calibration/ beside the checkpoint)",
    )
    calibrate.add_argument(
        "--holdout", type=float, default=0.3, help="fraction of identities held out of the fit (default: 0.3)"
    )
    calibrate.add_argument(
        "--bootstrap", type=int, default=200, help="bootstrap refits behind the bands (default: 200)"
    )
    calibrate.add_argument(
        "--seed", type=int, default=0, help="seed of the split and the bootstrap (default: 0)"
    )
    calibrate.add_argument(
        "--nonmated-cap",
        type=int,
        default=10_000_000,
        help="at most about this many non-mated pairs per set, a seeded hashed sample (default: 10,000,000)",
    )
    calibrate.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    calibrate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bar")
    calibrate.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Handler of `igfiqa calibrate`."""
    from jobs.evaluation import calibrate_checkpoint
    from pipeline.evaluation.options import EvalOptions

    options = EvalOptions(
        batch_size=args.batch_size,
        device=args.device,
        fr_models=(args.fr_model,),
        fr_bgr=args.fr_bgr,
        nonmated_sample_cap=args.nonmated_cap,
        progress=not args.no_progress,
    )
    out = args.out or args.checkpoint.parent / "calibration"
    outcome = calibrate_checkpoint(
        args.checkpoint,
        args.data,
        out,
        options,
        fmr=args.fmr,
        holdout=args.holdout,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    fit = outcome.fit
    print(
        f"threshold {outcome.threshold:.6g} at FMR {args.fmr:g} on {outcome.num_nonmated:,} non-mated comparisons; "
        f"map of {len(fit.knots_quality)} knots fitted on {fit.split['fit_identities']} identities"
    )
    print(f"held-out ({fit.split['holdout_identities']} identities), per quality decile:")
    print("  bin  quality range        mated  predicted  observed  (95% band of observed)")
    for r in fit.reliability:
        print(
            f"  {r['bin']:>3}  {r['quality_min']:8.4f} … {r['quality_max']:8.4f}  {r['mated_comparisons']:>6}  "
            f"{r['predicted_fnmr']:9.4f}  {r['observed_fnmr']:8.4f}  ({r['observed_lower']:.4f} … {r['observed_upper']:.4f})"
        )
    print(f"expected calibration error (ECE): {fit.ece:.4f}")
    print(f"calibration: {outcome.json_path}")
    print(f"plot:        {outcome.plot_path}")
    return 0
