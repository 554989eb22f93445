"""jobs.stages: the working folder, stage clock and markers, and the reuse rules of the stages
that the demo and the study share (no data is written, no training runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from data_prep.synth import generator_settings
from jobs.errors import UserError
from jobs.stages import data, train
from jobs.stages.train import TrainOutcome, completed_training, train_stage, training_config
from jobs.stages.work import StageClock, StageRecord, WorkFolder, marker_name, read_json_object

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def test_work_folder_is_absolute_with_the_demo_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = WorkFolder(Path("demo"))
    assert paths.out == tmp_path / "demo"
    assert (paths.synth, paths.train, paths.val) == (
        paths.out / "synth",
        paths.out / "train",
        paths.out / "val",
    )
    assert paths.preview == paths.out / "augmentation_preview.png"
    assert (paths.run, paths.eval) == (paths.out / "run", paths.out / "eval")
    assert paths.tracking_uri == f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}"
    assert marker_name("demo", "train") == "demo-train.json"


def test_stage_clock_numbers_stages_and_reports_how_they_ended() -> None:
    lines: list[str] = []
    clock = StageClock("demo", 2, lines.append)
    with clock.stage("synth", "make data") as record:
        record.reused, record.note = True, "synth.json exists"
    with pytest.raises(RuntimeError), clock.stage("train", "learn"):
        raise RuntimeError("boom")
    assert lines[0] == "[demo 1/2] synth: make data"
    assert lines[1].startswith("[demo 1/2] synth: reused in ") and lines[1].endswith(" s (synth.json exists)")
    assert lines[2] == "[demo 2/2] train: learn"
    assert lines[3].startswith("[demo 2/2] train: FAILED after ")
    assert [r.name for r in clock.records] == ["synth", "train"]
    table = clock.table().splitlines()
    assert table[0].split()[0] == "synth" and table[0].endswith("reused") and table[-1].split()[0] == "total"


def test_a_broken_marker_is_a_user_error(tmp_path: Path) -> None:
    assert read_json_object(tmp_path / "absent.json") is None
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match=r"unreadable .*remove it to redo that stage"):
        read_json_object(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        read_json_object(tmp_path / "list.json")


def test_synth_stage_reuses_the_same_settings_and_refuses_others(tmp_path: Path) -> None:
    paths = WorkFolder(tmp_path)
    paths.synth.mkdir()
    settings = {
        "identities": 40,
        "images_per_identity": 12,
        "low_variance_fraction": 0.15,
        "clean_fraction": 0.5,
        "seed": 0,
        "generator": generator_settings(),
    }
    (paths.synth / "synth.json").write_text(json.dumps(settings))
    record = StageRecord("synth")
    data.synth_stage(paths, data.SynthSpec(identities=40), record)
    assert record.reused and record.note == "synth.json exists"
    with pytest.raises(UserError, match=r"synthesized with other settings: identities 40 \(asked 200\)"):
        data.synth_stage(paths, data.SynthSpec(), StageRecord("synth"))
    with pytest.raises(UserError, match=r"other settings: low_variance_fraction 0\.15 \(asked 0\.0\)"):
        data.synth_stage(
            paths, data.SynthSpec(identities=40, low_variance_fraction=0.0), StageRecord("synth")
        )
    # data of an earlier generator (degraded images from 0.15) is not reused as if it were today's
    earlier = {**settings, "generator": {"min_strength": 0.15, "mixed_degraded_fraction": 0.25}}
    (paths.synth / "synth.json").write_text(json.dumps(earlier))
    with pytest.raises(UserError, match=r"other settings: generator \{'min_strength': 0.15"):
        data.synth_stage(paths, data.SynthSpec(identities=40), StageRecord("synth"))


def test_synth_stage_refuses_converted_data_without_its_synth_json(tmp_path: Path) -> None:
    paths = WorkFolder(tmp_path)
    paths.train.mkdir()
    (paths.train / "dataset.json").write_text("{}")
    with pytest.raises(UserError, match=r"synth\.json is missing"):
        data.synth_stage(paths, data.SynthSpec(), StageRecord("synth"))


def test_data_stages_reuse_finished_outputs(tmp_path: Path) -> None:
    paths = WorkFolder(tmp_path)
    paths.train.mkdir()
    (paths.train / "dataset.json").write_text("{}")
    paths.synth.mkdir()
    for name in ("clean", "mixed"):
        (paths.synth / f"{name}.bin").write_bytes(b"")
        (paths.val / name).mkdir(parents=True)
        (paths.val / name / "dataset.json").write_text("{}")
    convert, bins = StageRecord("convert"), StageRecord("bins")
    data.convert_stage(paths, convert)
    data.bins_stage(paths, bins)
    assert convert.reused and bins.reused and bins.note == "clean, mixed: dataset.json exist"


def test_bins_stage_without_bin_files_is_a_user_error(tmp_path: Path) -> None:
    paths = WorkFolder(tmp_path)
    paths.synth.mkdir()
    with pytest.raises(UserError, match=r"no verification \.bin files"):
        data.bins_stage(paths, StageRecord("bins"))


def test_training_config_points_at_the_folder_then_applies_overrides(tmp_path: Path) -> None:
    paths = WorkFolder(tmp_path)
    config = training_config(CONFIG, paths, paths.run, ["run.name=demo", "run.dir=elsewhere"])
    assert config.data.dataset == str(paths.train)
    assert config.run.tracking_uri == paths.tracking_uri
    assert config.run.name == "demo"
    assert config.run.dir == str(Path("elsewhere").resolve())  # overrides come last, then paths are absolute


def test_train_outcome_round_trip_and_older_markers(tmp_path: Path) -> None:
    outcome = TrainOutcome("ckpt", "run1", 8, "here", seconds=3.0, seconds_per_step=0.5)
    assert TrainOutcome.from_dict(json.loads(json.dumps(outcome.as_dict()))) == outcome
    older = TrainOutcome.from_dict({"checkpoint": "ckpt", "global_step": 4})  # before seconds/where
    assert older.where == "" and older.mlflow_run_id == "" and math.isnan(older.seconds)


def test_train_stage_trains_here_once_then_reuses(tmp_path: Path, monkeypatch) -> None:
    paths = WorkFolder(tmp_path)
    config = training_config(CONFIG, paths, paths.run, [])
    checkpoint = paths.run / "checkpoints" / "last.ckpt"
    launches: list[int] = []

    def fake_launch(config, *, nproc):
        launches.append(nproc)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"")
        return {
            "status": "completed",
            "global_step": 8,
            "checkpoint": str(checkpoint),
            "mlflow_run_id": "abc",
            "metrics": {"seconds_per_step": 0.25},
        }

    monkeypatch.setattr("jobs.launch.launch_local", fake_launch)
    monkeypatch.setattr("jobs.launch.resumed_run_id", lambda config: "")  # the fake checkpoint is empty
    said: list[str] = []
    kwargs = {"label": "demo", "nproc": 2, "here_because": "--local was given", "cluster": None}
    record = StageRecord("train")
    first = train_stage(config, record, say=said.append, job_log=None, **kwargs)  # type: ignore[arg-type]
    assert launches == [2] and not record.reused
    assert first.where == "here with 2 processes, not on SLURM because --local was given"
    assert first.seconds_per_step == 0.25 and said == [
        "  training HERE, not on SLURM, because --local was given"
    ]
    assert completed_training(config, "demo") == first
    assert json.loads((paths.run / "demo-train.json").read_text())["global_step"] == 8

    record = StageRecord("train")
    again = train_stage(config, record, say=said.append, job_log=None, **kwargs)  # type: ignore[arg-type]
    assert again == first and record.reused and launches == [2]
    assert record.note == f"step 8, trained {first.where}"


def test_a_job_sbatch_refuses_is_a_reason_to_train_here(tmp_path: Path, monkeypatch) -> None:
    from jobs.launch import SubmissionRefusedError

    def refuse(config, profile):
        raise SubmissionRefusedError(
            "sbatch refused the job: sbatch: error: invalid partition specified: gpu"
        )

    monkeypatch.setattr("jobs.launch.submit_training", refuse)
    config = training_config(CONFIG, WorkFolder(tmp_path), tmp_path / "run", [])
    assert train.submit_or_reason(config, profile=None) == (  # type: ignore[arg-type]
        "the submission to SLURM failed (sbatch refused the job: sbatch: error: invalid partition specified: gpu)"
    )


def test_an_earlier_job_still_queued_is_not_submitted_twice(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "squeue").write_text("#!/bin/sh\necho 'RUNNING|None|node-1'\n")
    (tmp_path / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    paths = WorkFolder(tmp_path / "demo")
    paths.run.mkdir(parents=True)
    (paths.run / "demo-job.json").write_text(json.dumps({"job_id": "87", "folder": "/x/submitit"}))
    config = training_config(CONFIG, paths, paths.run, [])
    assert train.active_job(paths.run, "demo") == train.ActiveJob("87", "RUNNING", "/x/submitit")
    with pytest.raises(UserError, match=r"SLURM job 87 of an earlier demo is still RUNNING"):
        train_stage(
            config,
            StageRecord("train"),
            label="demo",
            nproc=1,
            here_because=None,
            cluster=None,
            say=print,
            job_log=None,  # type: ignore[arg-type]
        )


def test_the_weight_histogram_marks_the_known_low_variance_identities(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    from data_prep.convert import convert
    from data_prep.synth import synthesize

    paths = WorkFolder(tmp_path)
    synthesize(paths.synth, identities=20, images_per_identity=4, seed=0)
    convert(paths.synth, paths.train, progress=False)
    assert train.plot_weights_against_ground_truth(paths, paths.run) is None  # no weights kept yet
    plots = paths.run / "plots"
    plots.mkdir(parents=True)
    np.save(plots / "class_weights.npy", np.linspace(0, 1, 20))
    png = train.plot_weights_against_ground_truth(paths, paths.run)
    assert png == plots / "class_weights_vs_truth.png" and png.stat().st_size > 5_000
    truth = pd.read_parquet(paths.synth / "ground_truth.parquet")
    assert truth.groupby("identity")["low_variance"].max().sum() >= 1  # something was marked
