"""`igfiqa prep`: the offline data stages (synth, convert, bins, inspect).

Argument parsing and printing; each stage and its MLflow lineage run is `jobs.stages.data`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from jobs.commands.common import add_stage_tracking_options, add_wait_lock_option, stage_tracking_uri
from jobs.errors import UserError

log = logging.getLogger(__name__)

PREP_DESCRIPTION = """\
Offline data stages: turn InsightFace-style data into DALI-readable shards.

  igfiqa prep synth --out work/full/synth                      # the embedded synthetic dataset
  igfiqa prep convert work/full/synth --out work/full/train    # train.rec/.idx/property -> shards
  igfiqa prep bins work/full/synth/*.bin --out work/full/val   # verification .bin files -> shards
  igfiqa prep inspect work/full/train                          # counts, histograms, checks

Every stage is idempotent: run it again after a failure or a kill and it resumes.
Bad input stops with one line naming the file, the record and the byte offset.

synth, convert and bins each log an MLflow run (experiment igfiqa-<stage>) with the
output's dataset_fingerprint and the source files' XXH3-128 checksums: the lineage that training
and evaluation runs point back to (their dataset_fingerprint tags). --no-track skips it.
"""

CONVERT_DESCRIPTION = """\
Convert a training set into globally shuffled webdataset shards.

SOURCE is one of:
  a RecordIO dataset   a folder holding train.rec (+ train.idx and property, as InsightFace
                       ships them) or a .rec file; without an .idx the .rec is scanned
  an image folder      ROOT/<identity>/<image> with *.jpg, *.jpeg or *.png images, one
                       folder per identity (WebFace42M's layout); identity folders sorted
                       by name get labels 0..C-1
  a list file          a .lst with one image per line: InsightFace's aligned<TAB>path<TAB>label,
                       MXNet im2rec's index<TAB>label<TAB>path, or `path label`; relative
                       paths start at the list's folder

Writes into DIR:
  shards/shard-NNNNN.tar   {key}.jpg (image bytes exactly as stored) + {key}.cls (label)
  shards/shard-NNNNN.idx   DALI webdataset index (what wds2idx writes)
  manifest.parquet         key, record, label, shard, sha256, nbytes, offset, position
                           (+ path: the image's source file, for image folders and lists)
  classes.parquet          label, count (+ name: the identity folder, for image folders)
  dropped.parquet          with --skip-bad: file, record, offset, reason of each entry left out
  dataset.json             written last: its presence means the conversion is complete

Every image is checked before anything is written: its RecordIO framing and label,
and its JPEG/PNG structure (markers, a frame header, the end-of-image marker) and
size (RecordIO: property's, else the most common; image folders and lists: 112x112).
Bad records and files are all listed, then the conversion stops; so are, in an image
folder, files that are not JPEG/PNG, folders inside identity folders and folders that
cannot be read (files directly in ROOT belong to no identity: they are named in the
log and not converted). --skip-bad converts without them, --verify-decode also decodes
every image (about 11x slower with one worker: a Pillow decode per image).

--resize SIZE (image folders and lists): square images of another size are resized
once, here, to SIZE x SIZE with Pillow's LANCZOS filter (anti-aliased when shrinking,
the least blurring of Pillow's filters) and stored re-encoded (JPEG quality 95, PNG
lossless); images already SIZE x SIZE are stored as they are. Training reads 112x112.

Re-running the same command skips shards already written and verified, so a
killed conversion resumes and ends byte-identical to an uninterrupted one (an
image folder is listed again and every file stat'ed; its images are read again
only if something changed). DIR must be new, empty, or hold this same conversion.
One conversion writes into DIR at a time: a second refuses at once, naming the host
and pid of the first (--wait-lock waits for it instead).

examples:
  igfiqa prep convert data/faces_webface_112x112 --out work/casia --workers 8
  igfiqa prep convert data/ms1m/train.rec --out work/ms1m --submit slurm/clusters/local.yaml
  igfiqa prep convert /data/webface42m --out work/webface42m --skip-bad --submit slurm/clusters/local.yaml
  igfiqa prep convert /data/faces/train.lst --out work/faces --resize 112 --workers 8
  igfiqa prep convert work/eval/seed-1000000 --out work/eval/seed-1000000-conv
"""

BINS_DESCRIPTION = """\
Convert InsightFace verification sets (lfw.bin, cfp_fp.bin, ...) into shards.

Each FILE.bin is a pickle of (list of encoded images, list of issame); pair i is
images 2i and 2i+1. The pickles are read with a restricted unpickler: only byte
strings, lists, tuples and numpy arrays are admitted, anything else (code) is
refused. Output per set DIR/<name>/: one shard (+ index), manifest.parquet
(key, index, sha256, nbytes, shard, offset), pairs.parquet (left, right, issame)
and dataset.json (kind "verification", label = image index).

example:
  igfiqa prep bins data/ms1m/lfw.bin data/ms1m/cfp_fp.bin --out work/val
"""

SYNTH_DESCRIPTION = """\
Write the embedded synthetic face dataset, in the formats real data comes in.

DIR gets train.rec/train.idx/property (InsightFace layout), clean.bin and
mixed.bin (verification pairs of identities not in training; the same renderings,
undegraded in clean, mostly degraded in mixed) and ground truth as parquet:
ground_truth.parquet (record, identity, degradation, strength in [0, 1],
low_variance) and <set>_ground_truth.parquet. Deterministic by --seed.

Degradations: blur, lowres, noise, occlusion, dark, jpeg. A fraction of
identities (--low-variance-fraction) has near-duplicate images, most of them
degraded alike: the case IG-FIQA's variance weighting is about.

--identity-set writes an identity-labelled evaluation set instead: --identities N
identities x exactly --images-per-identity K aligned 112x112 images, as an image
folder DIR/id-NNNNN/<n>.jpg, and DIR/ground_truth.parquet (path, identity, image,
degradation, strength). Its identities are those of the seed's verification sets,
never a training identity; as in the mixed set, a quarter of the images is degraded,
at strengths from 0.35 to 1. `igfiqa prep convert DIR --out CONVERTED` converts it
like any image folder (label = identity); the manifest's path column joins the
ground truth.

examples:
  igfiqa prep synth --out work/synth-200 --identities 200 --images-per-identity 12
  igfiqa prep synth --identity-set --out work/eval/seed-1000000 --identities 300 --images-per-identity 8 --seed 1000000
"""

INSPECT_DESCRIPTION = """\
Report on a dataset folder: counts, class-size histogram, shard sizes and checks.

DIR may be a converted dataset (holds dataset.json), a folder of converted
verification sets (from `prep bins`), a RecordIO source (train.rec ...), or an
image folder or .lst list (every file read and checked as `prep convert` would).
Checks: every shard and index present with the recorded size and count, the
manifest agrees with the shards, labels within range; --verify also recomputes
every checksum (shards and images) and checks every image's structure and size
(--verify-decode: decodes each one too). A RecordIO source is checked record by
record; --json lists every bad record. Exit status 1 when a check fails.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `igfiqa prep ...` to the top-level parser."""
    prep = subparsers.add_parser(
        "prep",
        help="offline data stages: synth, convert, bins, inspect",
        description=PREP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = prep.add_subparsers(dest="prep_command", metavar="STAGE", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    convert = sub.add_parser(
        "convert",
        help="RecordIO, image folder or .lst list -> shards",
        description=CONVERT_DESCRIPTION,
        formatter_class=fmt,
    )
    convert.add_argument(
        "source",
        type=Path,
        help="RecordIO dataset folder or .rec file, image folder ROOT/<identity>/<image>, or .lst list",
    )
    convert.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    convert.add_argument(
        "--samples-per-shard",
        type=int,
        default=5000,
        metavar="N",
        help="images per tar shard (default: 5000)",
    )
    convert.add_argument(
        "--workers", type=int, default=1, metavar="N", help="local processes writing shards (default: 1)"
    )
    convert.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: 0)")
    convert.add_argument(
        "--skip-bad",
        action="store_true",
        help="convert without the bad image records (listed in DIR/dropped.parquet) instead of stopping",
    )
    convert.add_argument(
        "--verify-decode",
        action="store_true",
        help="also decode every image fully (slower; the default check reads structure and size only)",
    )
    convert.add_argument(
        "--resize",
        type=int,
        default=None,
        metavar="SIZE",
        help="image folders and lists: resize square images of another size to SIZE x SIZE (Pillow LANCZOS) "
        "instead of refusing them",
    )
    add_wait_lock_option(convert, "another conversion is writing into DIR")
    convert.add_argument(
        "--submit",
        metavar="PROFILE",
        help="run the shard writing as a SLURM array job on this cluster profile (e.g. slurm/clusters/local.yaml)",
    )
    add_stage_tracking_options(convert)
    convert.set_defaults(func=_run_convert)

    bins = sub.add_parser(
        "bins", help="verification .bin -> shards", description=BINS_DESCRIPTION, formatter_class=fmt
    )
    bins.add_argument(
        "files", type=Path, nargs="+", metavar="FILE.bin", help="InsightFace verification pickles"
    )
    bins.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output folder (one subfolder per set)"
    )
    add_stage_tracking_options(bins)
    bins.set_defaults(func=_run_bins)

    synth = sub.add_parser(
        "synth", help="write the synthetic dataset", description=SYNTH_DESCRIPTION, formatter_class=fmt
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    synth.add_argument(
        "--identity-set",
        action="store_true",
        help="write an identity-labelled evaluation set (DIR/<identity>/<n>.jpg + ground truth) instead",
    )
    synth.add_argument(
        "--identities",
        type=int,
        default=None,
        metavar="N",
        help="training identities (default: 200); with --identity-set: its identities (default: 300)",
    )
    synth.add_argument(
        "--images-per-identity",
        type=int,
        default=None,
        metavar="N",
        help="mean images per identity (default: 12); with --identity-set: exactly N (default: 8)",
    )
    synth.add_argument(
        "--low-variance-fraction",
        type=float,
        default=None,
        metavar="F",
        help="share of near-duplicate identities (default: 0.15)",
    )
    synth.add_argument(
        "--clean-fraction",
        type=float,
        default=None,
        metavar="F",
        help="share of undegraded images in ordinary identities (default: 0.5)",
    )
    synth.add_argument(
        "--verification-identities", type=int, default=None, metavar="N", help="identities in the .bin sets"
    )
    synth.add_argument("--verification-pairs", type=int, default=None, metavar="N", help="pairs per .bin set")
    synth.add_argument("--seed", type=int, default=0, help="everything is a function of it (default: 0)")
    synth.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that render the images; the output does not depend on it "
        "(default: the CPU count, at most 8)",
    )
    add_stage_tracking_options(synth)
    synth.set_defaults(func=_run_synth)

    inspect = sub.add_parser(
        "inspect", help="counts, histograms, checks", description=INSPECT_DESCRIPTION, formatter_class=fmt
    )
    inspect.add_argument("directory", type=Path, metavar="DIR")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="also recompute every checksum and check every image's structure",
    )
    inspect.add_argument(
        "--verify-decode", action="store_true", help="with --verify: also decode every image fully (slower)"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_run_inspect)


def _print_run(stage: str, run_id: str | None) -> None:
    if run_id:
        print(f"MLflow run: {run_id} (experiment igfiqa-{stage})")


def _run_convert(args: argparse.Namespace) -> int:
    from data_prep.convert import check_settings, plural
    from jobs.stages.data import run_convert

    check_settings(samples_per_shard=args.samples_per_shard, seed=args.seed, workers=args.workers)
    try:
        converted = run_convert(
            args.source,
            args.out,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            seed=args.seed,
            cluster=args.submit,
            tracking_uri=stage_tracking_uri(args),
            skip_bad=args.skip_bad,
            image_check="decode" if args.verify_decode else "structure",
            wait_lock=args.wait_lock,
            resize=args.resize,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: finished shards are kept; run the same command again to resume {args.out}",
            file=sys.stderr,
        )
        return 130
    info = converted.info
    dropped = (
        f"; {plural(info.dropped, 'bad entry' if converted.from_files else 'bad record')} dropped "
        f"(see {info.dropped_path})"
        if info.dropped
        else ""
    )
    print(
        f"converted {plural(info.num_images, 'image')} of {plural(info.num_classes, 'class')} into "
        f"{plural(len(info.shards), 'shard')}: {info.root}{dropped}"
    )
    _print_run("convert", converted.mlflow_run_id)
    return 0


def _run_bins(args: argparse.Namespace) -> int:
    from data_prep.convert import plural
    from jobs.stages.data import run_bins

    infos, run_id = run_bins(args.files, args.out, tracking_uri=stage_tracking_uri(args))
    for info in infos:
        print(
            f"{info.root.name}: {plural(info.num_images, 'image')}, {plural(info.num_images // 2, 'pair')} "
            f"-> {info.root}"
        )
    _print_run("bins", run_id)
    return 0


IDENTITY_SET_EXCLUDES = (
    "low_variance_fraction",
    "clean_fraction",
    "verification_identities",
    "verification_pairs",
)


def _run_synth(args: argparse.Namespace) -> int:
    from jobs.stages.data import IdentitySetSpec, SynthSpec, run_synth, run_synth_identity_set

    if args.identity_set:
        given = [
            f"--{name.replace('_', '-')}" for name in IDENTITY_SET_EXCLUDES if getattr(args, name) is not None
        ]
        if given:
            raise UserError(f"{', '.join(given)}: not options of an identity-labelled set (--identity-set)")
        default = IdentitySetSpec()
        spec = IdentitySetSpec(
            identities=args.identities if args.identities is not None else default.identities,
            images_per_identity=(
                args.images_per_identity
                if args.images_per_identity is not None
                else default.images_per_identity
            ),
            seed=args.seed,
        )
        result, run_id = run_synth_identity_set(
            args.out, spec, tracking_uri=stage_tracking_uri(args), workers=args.workers
        )
        print(
            f"synthesized an identity-labelled set of {result.num_images} images of "
            f"{result.num_identities} identities: {result.out} (ground truth: "
            f"{result.out / 'ground_truth.parquet'})"
        )
        _print_run("synth", run_id)
        return 0
    defaults = SynthSpec()
    spec = SynthSpec(
        identities=args.identities if args.identities is not None else defaults.identities,
        images_per_identity=(
            args.images_per_identity if args.images_per_identity is not None else defaults.images_per_identity
        ),
        low_variance_fraction=(
            args.low_variance_fraction
            if args.low_variance_fraction is not None
            else defaults.low_variance_fraction
        ),
        clean_fraction=args.clean_fraction if args.clean_fraction is not None else defaults.clean_fraction,
        verification_identities=args.verification_identities,
        verification_pairs=args.verification_pairs,
        seed=args.seed,
    )
    result, run_id = run_synth(args.out, spec, tracking_uri=stage_tracking_uri(args), workers=args.workers)
    sets = ", ".join(p.name for p in result.verification_bins.values())
    print(
        f"synthesized {result.num_images} images of {result.num_identities} identities + {sets}: {result.out}"
    )
    _print_run("synth", run_id)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect import inspect_path

    report = inspect_path(args.directory, verify=args.verify or args.verify_decode, decode=args.verify_decode)
    _print_to_pipe(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def _print_to_pipe(text: str) -> None:
    """Print `text`; a reader that stopped early (`| head`) ends the output quietly, not in a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # stdout's pending bytes can never be written: point it at /dev/null so the flush at exit is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
