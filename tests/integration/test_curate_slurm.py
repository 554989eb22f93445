"""`curate score --submit`: one SLURM array task per shard range on the local cluster gives the scores
of a local run; re-submitting after a lost shard runs one task for that shard only; the command
line path writes the quality file and logs the array job id. `curate filter --submit`: the same
for the curated dataset, whose files are the bytes of a local run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.convert import convert
from data_prep.curate import Rule, curate, plan_curation
from data_prep.dataset import dataset_fingerprint, load_dataset_info
from data_prep.manifest import read_manifest
from data_prep.quality_file import (
    QualitySource,
    read_quality_source,
    read_quality_table,
    write_quality_file,
)
from data_prep.synth import synthesize
from jobs.curate_job import shard_ranges, start_filter, start_scoring
from pipeline.curation.scoring import SCORE_DIR, score_dataset
from tests.eval_fixtures import make_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 images in about five shards of 21."""
    root = tmp_path_factory.mktemp("curate_slurm")
    synthesize(root / "synth", identities=10, images_per_identity=10, seed=4)
    convert(root / "synth", root / "train", samples_per_shard=21, progress=False)
    return root / "train"


def test_shard_ranges_cover_every_shard_once() -> None:
    assert shard_ranges(5, 2) == [[0, 1], [2, 3], [4]]
    assert shard_ranges(3, 5) == [[0, 1, 2]]
    assert shard_ranges(0, 2) == []


@pytest.mark.timeout(600)
def test_slurm_array_scoring_matches_local_and_resumes(
    slurm_cluster, submitit_folder, dataset: Path, tmp_path: Path
) -> None:
    checkpoint, _ = make_checkpoint(tmp_path / "model.ckpt", run_id="r1")
    local = score_dataset(
        checkpoint, dataset, tmp_path / "local", device="cpu", batch_size=16, progress=False
    )

    out = tmp_path / "slurm"
    array = start_scoring(
        checkpoint,
        dataset,
        out,
        profile=slurm_cluster.profile,
        shards_per_task=2,
        device="cpu",
        batch_size=16,
        num_threads=1,
        folder=submitit_folder(),
    )
    num_shards = len(load_dataset_info(dataset).shards)
    assert num_shards >= 4
    assert array.details == [f"shards {r[0]}-{r[-1]}" for r in shard_ranges(num_shards, 2)]
    assert len({str(job.job_id).split("_")[0] for job in array.jobs}) == 1  # one array job, a task per range
    result = array.wait(progress=False)
    remote_table, local_table = read_quality_table(result.path), read_quality_table(local.path)
    assert remote_table[["key", "record", "label"]].equals(local_table[["key", "record", "label"]])
    # other processes, other thread counts: the same numbers to float rounding
    np.testing.assert_allclose(remote_table["quality"], local_table["quality"], rtol=1e-5, atol=1e-5)
    assert read_quality_source(result.path) == read_quality_source(local.path)

    # a lost shard and no quality file (as after a failed task): only that shard is submitted again
    (out / SCORE_DIR / "part-00003.parquet").unlink()
    (out / "quality.parquet").unlink()
    kept = {p.name: p.stat().st_ino for p in (out / SCORE_DIR).glob("part-*.parquet")}
    again = start_scoring(
        checkpoint,
        dataset,
        out,
        profile=slurm_cluster.profile,
        shards_per_task=2,
        device="cpu",
        batch_size=16,
        num_threads=1,
        folder=submitit_folder(),
    )
    assert again.details == ["shards 3-3"] and len(again.jobs) == 1
    again.wait(progress=False)
    assert {name: (out / SCORE_DIR / name).stat().st_ino for name in kept} == kept
    assert read_quality_table(out / "quality.parquet")["quality"].tolist() == remote_table["quality"].tolist()


@pytest.mark.timeout(600)
def test_curate_score_submit_command(
    slurm_cluster, submitit_folder, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main

    submitit_folder()  # PYTHONPATH for the tasks
    checkpoint, _ = make_checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "cli"
    profile = REPO / "slurm" / "clusters" / "local.yaml"
    command = ["curate", "score", str(checkpoint), "--data", str(dataset), "--out", str(out), "--no-track"]
    assert main([*command, "--submit", str(profile), "--shards-per-task", "3", "--device", "cpu"]) == 0
    info = load_dataset_info(dataset)
    assert f"scored {info.num_images} images (SLURM array job " in capsys.readouterr().out
    assert (out / "quality.parquet").is_file()
    logs = list((out / SCORE_DIR / "slurm").glob("*/*_log.err"))
    assert len(logs) == len(shard_ranges(len(info.shards), 3))  # one task per range of three shards


def _quality_file(path: Path, dataset: Path) -> Path:
    manifest = read_manifest(dataset)[["key", "record", "label"]]
    manifest["quality"] = np.random.default_rng(9).normal(size=len(manifest)).astype(np.float32)
    source = QualitySource(dataset_fingerprint=dataset_fingerprint(dataset), model_fingerprint="f00d")
    write_quality_file(path, manifest, source)
    return path


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ROOT, but the lock and the SLURM logs."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock" and "slurm" not in p.relative_to(root).parts
    }


@pytest.mark.timeout(600)
def test_slurm_array_filter_writes_the_bytes_of_a_local_run_and_resumes(
    slurm_cluster, submitit_folder, dataset: Path, tmp_path: Path
) -> None:
    quality = _quality_file(tmp_path / "q.parquet", dataset)
    rule = Rule.parse("lowest:0.3", min_per_identity=2)
    local = tmp_path / "local"
    curate(dataset, quality, local, rule, samples_per_shard=13, progress=False)

    plan = plan_curation(dataset, quality, rule, samples_per_shard=13)
    assert plan.num_shards >= 5
    out = tmp_path / "slurm"
    array = start_filter(
        plan, out, profile=slurm_cluster.profile, shards_per_task=2, folder=submitit_folder()
    )
    assert array.details == [f"shards {r[0]}-{r[-1]}" for r in shard_ranges(plan.num_shards, 2)]
    assert len({str(job.job_id).split("_")[0] for job in array.jobs}) == 1  # one array job, a task per range
    info = array.wait(progress=False)
    assert info.num_images == plan.num_images
    assert _files(out) == _files(local)

    # as after a failed task: a shard not finished, nothing finalised: only that shard is submitted again
    for name in ("dataset.json", "manifest.parquet", "removed.parquet"):
        (out / name).unlink()
    (out / ".prep" / "shard-00003.json").unlink()
    kept = {p.name: p.stat().st_ino for p in (out / "shards").glob("*.tar") if p.name != "shard-00003.tar"}
    again = start_filter(
        plan, out, profile=slurm_cluster.profile, shards_per_task=2, folder=submitit_folder()
    )
    assert again.details == ["shards 3-3"] and len(again.jobs) == 1
    again.wait(progress=False)
    assert {name: (out / "shards" / name).stat().st_ino for name in kept} == kept
    assert _files(out) == _files(local)


@pytest.mark.timeout(600)
def test_curate_filter_submit_command(
    slurm_cluster, submitit_folder, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main

    submitit_folder()  # PYTHONPATH for the tasks
    quality = _quality_file(tmp_path / "q.parquet", dataset)
    out = tmp_path / "cli"
    profile = REPO / "slurm" / "clusters" / "local.yaml"
    command = ["curate", "filter", str(dataset), "--quality", str(quality), "--out", str(out)]
    command += ["--rule", "lowest:20%", "--samples-per-shard", "20", "--no-track", "--no-report"]
    assert main([*command, "--submit", str(profile), "--shards-per-task", "3"]) == 0
    assert " (SLURM array job " in capsys.readouterr().out
    info = load_dataset_info(out)
    logs = list((out / ".prep" / "slurm").glob("*/*_log.err"))
    assert len(logs) == len(shard_ranges(len(info.shards), 3))  # one task per range of three shards
