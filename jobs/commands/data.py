"""`igfiqa data preview`: look at what the training loader feeds the regression half."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.errors import UserError

log = logging.getLogger(__name__)

PREVIEW_HELP = """\
Write a grid image: for a few identities of a converted dataset, the clean image
beside several versions as the regression half sees them (random flip, then
rescale-blur, random erasing and color jitter, each with its probability), every
tile captioned with what it received. Augmentation settings come from the config
(data.augment.*), e.g. --set data.augment.p_erase=1.0 to see only erased versions.

examples:
  igfiqa data preview work/train --out work/preview.png
  igfiqa data preview work/train --out grid.png --config configs/protocol_s.yaml --identities 8 --versions 7
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data preview`."""
    data = sub.add_parser("data", help="look at training data as the loader delivers it")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = data_sub.add_parser(
        "preview",
        help="grid of clean images beside their regression-half versions",
        description=PREVIEW_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", type=Path, help="a folder written by `igfiqa prep convert`")
    p.add_argument("--out", type=Path, required=True, help="image file to write (e.g. grid.png)")
    p.add_argument("--config", type=Path, default=None, help="YAML config whose data.augment to use")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set data.augment.p_rescale=1.0",
    )
    p.add_argument("--identities", type=int, default=6, help="rows of the grid (default 6)")
    p.add_argument("--versions", type=int, default=5, help="degraded versions per identity (default 5)")
    p.add_argument("--seed", type=int, default=0, help="which identities and augmentations (default 0)")
    p.set_defaults(func=run_preview)


def run_preview(args: argparse.Namespace) -> int:
    """Handler of `igfiqa data preview`."""
    from pipeline.config import load_config
    from pipeline.data.preview import write_preview

    if args.identities < 1 or args.versions < 1 or args.seed < 0:
        raise UserError("--identities and --versions must be >= 1 and --seed >= 0")
    config = load_config(args.config, args.overrides)
    out = write_preview(
        args.dataset,
        args.out,
        config.data.augment,
        identities=args.identities,
        versions=args.versions,
        seed=args.seed,
    )
    print(out)
    log.info("wrote the preview grid %s", out)
    return 0
