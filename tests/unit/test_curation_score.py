"""`curate score` (pipeline.curation.scoring): the DALI decode-only graph gives exactly the training
graph's clean rows, the scores are the model's on those images, aligned to the manifest with the
fingerprints in the metadata; per-shard resumable (a run killed with SIGKILL once a part is
written, and redone, skips the finished shards and ends byte-identical); an OUT scoring another
model is refused."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_prep.convert import convert
from data_prep.dataset import dataset_fingerprint
from data_prep.errors import DataError
from data_prep.manifest import read_manifest
from data_prep.quality_file import read_quality_source, read_quality_table
from data_prep.sharded_output import FAULT_ENV
from data_prep.synth import synthesize
from pipeline.config import AugmentConfig
from pipeline.curation.scoring import SCORE_DIR, ScoringImages, score_dataset
from pipeline.data.augment_plan import draw_params
from pipeline.data.dali_graph import GraphBatch, build_decode_pipeline, run_graph
from pipeline.data.image_io import decode_image
from pipeline.data.image_store import ImageStore
from pipeline.data.sampler import stream_rng
from pipeline.evaluation.scoring import infer_batch
from pipeline.method.model import model_fingerprint
from tests.eval_fixtures import make_checkpoint, make_verification_set

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "model.ckpt", run_id="train-run-1", global_step=42
    )


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~190 images in shards of 24: eight source shards."""
    root = tmp_path_factory.mktemp("many_shards")
    synthesize(root / "synth", identities=16, images_per_identity=12, seed=5)
    convert(root / "synth", root / "train", samples_per_shard=24, progress=False)
    return root / "train"


def test_decode_graph_is_the_training_graph_on_clean_unflipped_rows(train_dataset: Path) -> None:
    store = ImageStore(train_dataset)
    rows = np.arange(12, dtype=np.int64) * 11 % len(store)
    params = draw_params(AugmentConfig(), 112, len(rows), stream_rng(0, 9))
    params = dataclasses.replace(params, flags=np.zeros((len(rows), 3), bool), flip=np.zeros(len(rows), bool))
    training = run_graph(GraphBatch(encoded=store.encoded(rows), rows=rows, params=params), image_size=112)
    fed = []

    def source() -> tuple:
        if fed:
            raise StopIteration
        fed.append(True)
        return store.encoded(rows), rows

    pipe = build_decode_pipeline(source, batch_size=len(rows), device_id=None, num_threads=1, prefetch=1)
    pipe.build()
    images, out_rows = (out.as_array() for out in pipe.run())
    assert np.array_equal(out_rows.reshape(-1), rows)
    assert np.array_equal(images, training["images"])


def test_scores_are_the_models_on_the_stored_images(
    train_dataset: Path, model_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, model = model_checkpoint
    scored = score_dataset(path, train_dataset, tmp_path / "q", device="cpu", batch_size=64, progress=False)
    manifest = read_manifest(train_dataset)
    table = read_quality_table(scored.path)
    assert table["key"].tolist() == manifest["key"].tolist()
    assert table["record"].tolist() == manifest["record"].tolist()
    assert table["label"].tolist() == manifest["label"].tolist()
    # the same images decoded by PIL (pixel-identical to DALI's CPU decoder) through the model
    store = ImageStore(train_dataset)
    rows = np.arange(0, len(manifest), 37)
    tensors = np.stack([decode_image(d, source="x").tensor for d in store.encoded(rows)])
    expected = infer_batch(model, tensors, torch.device("cpu")).quality
    np.testing.assert_allclose(table["quality"].to_numpy()[rows], expected, rtol=1e-4, atol=1e-4)
    source = read_quality_source(scored.path)
    assert source.dataset_fingerprint == dataset_fingerprint(train_dataset)
    assert source.model_fingerprint == model_fingerprint(model)
    assert (source.checkpoint, source.train_run_id, source.global_step) == (
        str(path.resolve()),
        "train-run-1",
        42,
    )
    assert source.num_images == len(manifest) and source.dataset_kind == "train"
    # done: a second call rescores nothing and leaves the file as it is
    before = scored.path.read_bytes()
    again = score_dataset(path, train_dataset, tmp_path / "q", device="cpu", batch_size=64, progress=False)
    assert again.path.read_bytes() == before


def test_a_task_holds_only_the_rows_of_its_shards(many_shards: Path, tmp_path: Path) -> None:
    every = ScoringImages(many_shards)
    task = ScoringImages(many_shards, shards=[5, 2])
    rows = np.concatenate([every.rows_of_shard(2), every.rows_of_shard(5)])
    assert len(task) == len(rows) == 48 and task.rows.tolist() == rows.tolist()
    assert task.keys.tolist() == every.keys[rows].tolist()
    assert task.labels.tolist() == every.labels[rows].tolist()
    assert task.rows_of_shard(5).tolist() == every.rows_of_shard(5).tolist()
    assert task.shard_of(int(rows[-1])) == 5
    assert [b.tobytes() for b in task.encoded(rows[::7])] == [b.tobytes() for b in every.encoded(rows[::7])]
    # a manifest row group holding a few shards is read, not the whole manifest: with one group per
    # 30 rows, shard 5 (rows 120-143) is read from the groups of rows 120-149
    copy = shutil.copytree(many_shards, tmp_path / "copy")
    pq.write_table(pq.read_table(copy / "manifest.parquet"), copy / "manifest.parquet", row_group_size=30)
    small = ScoringImages(copy, shards=[5])
    assert small.keys.tolist() == every.keys[every.rows_of_shard(5)].tolist()


def test_a_verification_set_is_scored_by_image_index(
    model_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = model_checkpoint
    folder = make_verification_set(tmp_path / "val", "lfw", num_pairs=6)
    scored = score_dataset(path, folder, tmp_path / "q", device="cpu", progress=False)
    table = read_quality_table(scored.path)
    assert len(table) == 12 and table["record"].tolist() == list(range(12)) == table["label"].tolist()
    assert np.isfinite(table["quality"]).all()
    assert read_quality_source(scored.path).dataset_kind == "verification"


def test_an_out_holding_another_models_scores_is_refused(
    train_dataset: Path, model_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = model_checkpoint
    out = tmp_path / "q"
    score_dataset(path, train_dataset, out, device="cpu", progress=False)
    other, _ = make_checkpoint(tmp_path / "other.ckpt", seed=1)
    before = (out / "quality.parquet").read_bytes()
    with pytest.raises(DataError, match=r"holds the scores of another run .*model_fingerprint"):
        score_dataset(other, train_dataset, out, device="cpu", progress=False)
    assert (out / "quality.parquet").read_bytes() == before


def _score_command(checkpoint: Path, dataset: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "curate", "score", str(checkpoint), "--data", str(dataset),
        "--out", str(out), "--device", "cpu", "--batch-size", "8", "--threads", "1", "--no-track",
    ]  # fmt: skip


def _parts(out: Path) -> dict[str, int]:
    """Each written part and its inode (a part written again gets a new one: temp + rename)."""
    return {p.name: p.stat().st_ino for p in sorted((out / SCORE_DIR).glob("part-*.parquet"))}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_scoring_resumes_and_ends_identical(
    many_shards: Path, model_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = model_checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(
        _score_command(path, many_shards, whole), check=True, env=env, capture_output=True, timeout=300
    )

    killed = tmp_path / "killed"
    process = subprocess.run(  # killed (SIGKILL) as soon as the part of shard 1 is written
        _score_command(path, many_shards, killed),
        env={**env, FAULT_ENV: "after-shard:1:KILL"},
        capture_output=True,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    before = _parts(killed)
    assert sorted(before) == ["part-00000.parquet", "part-00001.parquet"]
    assert not (killed / "quality.parquet").exists()

    resumed = subprocess.run(
        _score_command(path, many_shards, killed), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(before)} of 8 shards already scored" in resumed.stderr
    assert "takes over the lock" in resumed.stderr or "taking over the lock" in resumed.stderr
    after = _parts(killed)
    assert {name: after[name] for name in before} == before  # the finished shards were not scored again
    assert len(after) == 8
    assert (killed / "quality.parquet").read_bytes() == (whole / "quality.parquet").read_bytes()
    assert pq.read_metadata(killed / "quality.parquet").num_rows == len(read_manifest(many_shards))


@pytest.mark.gpu
def test_gpu_scoring_matches_the_cpu(
    train_dataset: Path, model_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path, no_tf32: None
) -> None:
    """The "mixed" (nvJPEG) decoder and the GPU model: the CPU's scores up to the decoders' rounding."""
    path, _ = model_checkpoint
    cpu = score_dataset(path, train_dataset, tmp_path / "cpu", device="cpu", progress=False)
    gpu = score_dataset(path, train_dataset, tmp_path / "gpu", device="cuda", progress=False)
    spread = float(cpu.quality.max() - cpu.quality.min())
    assert np.corrcoef(cpu.quality, gpu.quality)[0, 1] > 0.999
    assert float(np.abs(cpu.quality - gpu.quality).max()) < 0.02 * spread
    assert read_quality_table(gpu.path)["key"].tolist() == read_quality_table(cpu.path)["key"].tolist()
