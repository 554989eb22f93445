"""`prep convert --submit`: the shard stage as a SLURM array on the local cluster gives the same
bytes as a local conversion, and a failing shard task is reported with its log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.convert import convert, prepare_conversion
from data_prep.synth import synthesize
from jobs.prep_job import ShardTaskError, start_conversion

pytestmark = pytest.mark.slurm

SAMPLES_PER_SHARD = 40
SEED = 7


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, identities=24, images_per_identity=6, seed=3)
    return out


def _dataset_files(root: Path) -> dict[str, bytes]:
    """Everything a conversion delivers (not its .prep bookkeeping), by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".prep" not in p.relative_to(root).parts
    }


@pytest.mark.timeout(300)
def test_slurm_array_conversion_is_byte_identical_to_local(
    slurm_cluster, submitit_folder, synthetic_source: Path, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    info_local = convert(
        synthetic_source, local, samples_per_shard=SAMPLES_PER_SHARD, seed=SEED, progress=False
    )
    assert len(info_local.shards) >= 3  # several array tasks, more than run at once

    remote = tmp_path / "slurm"
    array = start_conversion(
        synthetic_source,
        remote,
        profile=slurm_cluster.profile,
        samples_per_shard=SAMPLES_PER_SHARD,
        seed=SEED,
        folder=submitit_folder(),
        progress=False,
    )
    assert len(array.jobs) == len(info_local.shards)
    assert {str(job.job_id) for job in array.jobs} == {
        f"{array.array_id}_{i}" for i in range(len(array.jobs))
    }
    info = array.wait(progress=False)
    assert array.result is info
    assert info.num_images == info_local.num_images

    local_files, remote_files = _dataset_files(local), _dataset_files(remote)
    assert sorted(remote_files) == sorted(local_files)
    assert "dataset.json" in remote_files and "manifest.parquet" in remote_files
    for name, data in local_files.items():
        if name != "dataset.json":
            assert remote_files[name] == data, f"{name} differs between the SLURM and the local conversion"
    # dataset.json holds no timestamps or paths that could differ: compare it whole, as data
    assert json.loads(remote_files["dataset.json"]) == json.loads(local_files["dataset.json"])


@pytest.mark.timeout(300)
def test_prep_convert_submit_command(slurm_cluster, synthetic_source: Path, tmp_path: Path, capsys) -> None:
    from jobs.cli import main

    out = tmp_path / "cli"
    profile = Path(__file__).resolve().parents[2] / "slurm" / "clusters" / "local.yaml"
    argv = ["prep", "convert", str(synthetic_source), "--out", str(out), "--samples-per-shard", "60"]
    assert main([*argv, "--submit", str(profile)]) == 0
    assert "converted" in capsys.readouterr().out
    assert (out / "dataset.json").is_file()
    assert len(list((out / ".prep" / "slurm").glob("*/*_log.err"))) == len(
        json.loads((out / "dataset.json").read_text())["shards"]
    )


@pytest.mark.timeout(300)
def test_failed_shard_tasks_are_reported_with_their_logs(
    slurm_cluster, submitit_folder, synthetic_source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "broken"
    plan = prepare_conversion(synthetic_source, out, samples_per_shard=SAMPLES_PER_SHARD * 2, seed=SEED)
    # the plan stays valid on paper, but the table the shard tasks read is garbage
    (out / ".prep" / "plan.parquet").write_bytes(b"not a parquet file")
    array = start_conversion(
        synthetic_source,
        out,
        profile=slurm_cluster.profile,
        samples_per_shard=SAMPLES_PER_SHARD * 2,
        seed=SEED,
        folder=submitit_folder(),
        progress=False,
    )
    with pytest.raises(ShardTaskError) as info:
        array.wait(progress=False)
    message = str(info.value)
    assert f"{plan.num_shards} of {plan.num_shards} shard tasks" in message
    task_lines = [line for line in message.splitlines() if line.startswith("  shard ")]
    assert len(task_lines) == plan.num_shards
    for line in task_lines:
        assert ", FAILED): " in line
        assert "Parquet" in line.split("): ", 1)[1]  # the task's own exception, not srun's exit note
    stderr_paths = [line.split("stderr: ", 1)[1] for line in message.splitlines() if "stderr: " in line]
    assert len(stderr_paths) == plan.num_shards
    assert all(Path(p).is_file() and "Traceback" in Path(p).read_text() for p in stderr_paths)
    assert message.endswith(f"no dataset.json was written; run the same command again to resume {out}")
    assert not (out / "dataset.json").exists() and array.result is None
    assert sorted(failure.task for failure in array.failed) == list(range(plan.num_shards))
