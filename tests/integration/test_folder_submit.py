"""`prep convert ROOT --submit PROFILE` of an image folder: the shards as a SLURM array on the local
cluster give the same bytes as a local conversion (a resized image included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.convert import convert
from jobs.prep_job import start_conversion
from tests.unit.test_file_conversion import image_bytes, make_folder

pytestmark = pytest.mark.slurm


def _dataset_files(root: Path) -> dict[str, bytes]:
    """Everything a conversion delivers (not its .prep bookkeeping), by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".prep" not in p.relative_to(root).parts
    }


@pytest.mark.timeout(300)
def test_slurm_array_conversion_of_a_folder_is_byte_identical_to_local(
    slurm_cluster, submitit_folder, tmp_path: Path
) -> None:
    root = tmp_path / "faces"
    make_folder(root, {f"person {i}": 3 for i in range(6)})
    (root / "person 2" / "large.jpg").write_bytes(image_bytes(5, 160))
    local = convert(root, tmp_path / "local", samples_per_shard=5, seed=2, resize=112, progress=False)
    assert len(local.shards) >= 3
    array = start_conversion(
        root,
        tmp_path / "slurm",
        profile=slurm_cluster.profile,
        samples_per_shard=5,
        seed=2,
        folder=submitit_folder(),
        progress=False,
        resize=112,
    )
    assert len(array.jobs) == len(local.shards)
    info = array.wait(progress=False)
    assert info.source == local.source and info.num_classes == 6
    assert _dataset_files(tmp_path / "slurm") == _dataset_files(tmp_path / "local")
