"""`igfiqa prep convert --submit PROFILE`: the shard stage of a conversion as a SLURM array.

The plan is made here (`prepare_conversion`: validates the source, draws the shuffle), every
shard becomes one array task running `write_shard(out, i)` (idempotent and atomic, so a
requeued or re-submitted task is harmless), and once all tasks finished the conversion is
finalised here (`finalize_conversion`, which writes dataset.json last). A failed task is
reported with its state and stderr file; re-running the same command resumes, since
finished shards verify and are skipped.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.array_job import ArrayJob, ArrayTaskError, submit_array
from jobs.cluster import ClusterProfile, load_profile

if TYPE_CHECKING:
    from data_prep.dataset import DatasetInfo


class ShardTaskError(ArrayTaskError):
    """One or more array tasks of a conversion did not complete."""


def start_conversion(
    source: str | Path,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    samples_per_shard: int,
    seed: int,
    folder: str | Path | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    image_check: str = "structure",
    resize: int | None = None,
) -> ArrayJob[DatasetInfo]:
    """Plan here and submit the shards as one SLURM array (a task per shard); `.wait()` finalises
    and returns the dataset, or raises ShardTaskError naming each failed task.

    `profile` is a ClusterProfile or the path of one. The submitit logs go to `folder` (default:
    OUT/.prep/slurm/<time>-<pid>, new for every submission). `skip_bad`, `image_check`, `resize`: see
    `data_prep.convert.prepare_conversion`.
    """
    from data_prep.convert import finalize_conversion, prepare_conversion, write_shard

    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    out = Path(out)
    plan = prepare_conversion(
        Path(source),
        out,
        samples_per_shard=samples_per_shard,
        seed=seed,
        progress=progress,
        skip_bad=skip_bad,
        image_check=image_check,
        resize=resize,
    )
    if folder is None:
        folder = out / ".prep" / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    planned = plan.out.resolve()

    def finalize(_: list[Any]) -> DatasetInfo:
        return finalize_conversion(out)

    return submit_array(
        [functools.partial(write_shard, planned, shard) for shard in range(plan.num_shards)],
        profile=profile,
        folder=folder,
        job_name=f"convert-{out.name}",
        what="shard tasks",
        labels=[f"shard {shard}" for shard in range(plan.num_shards)],
        finalize=finalize,
        error=ShardTaskError,
        unfinished=f"no dataset.json was written; run the same command again to resume {out}",
    )
