"""`igfiqa matchers build | list` end to end on a tiny spec: train FR-only, export, measure, record,
reuse on a second call, rebuild only the matcher whose recipe changed; the ONNX file as `--fr-model`.

Real parts: the synthetic generator, conversion, DALI on the CPU, the trainer, the ONNX exporter
and onnxruntime, MLflow on sqlite. A few training steps per matcher, one process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs.cli import main

pytest.importorskip("nvidia.dali")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _spec_text(second_lr: float = 0.1) -> str:
    base = REPO / "configs" / "tiny_cpu.yaml"
    common = "data.fr_batch=16, optim.max_steps=3, run.log_every=1, run.checkpoint_every_steps=0"
    return f"""
data: {{identities: 16, images_per_identity: 5, seed: 2000000}}
evaluation: {{seed: 1000000, pairs: 40, identities: 12}}
matchers:
  - name: tiny-cos
    config: {base}
    seed: 1
    overrides: [{common}, model.embedding_size=32]
  - name: small-arc
    config: {base}
    seed: 2
    overrides: [{common}, model.backbone=iresnet_small, model.embedding_size=48, loss.margin=arcface,
                optim.lr={second_lr}]
"""


def _mtimes(out: Path) -> dict[str, int]:
    """Modification times of every file under the runs and of the ONNX files."""
    files = [*out.glob("*.onnx"), *(p for p in (out / "runs").rglob("*") if p.is_file())]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The spec built once through the command line, as the tests of this module find it."""
    folder = tmp_path_factory.mktemp("matchers")
    spec = folder / "spec.yaml"
    spec.write_text(_spec_text())
    out = folder / "out"
    assert main(["matchers", "build", str(spec), "--out", str(out), "--nproc", "1"]) == 0
    return {"spec": spec, "out": out, "json": json.loads((out / "matchers.json").read_text())}


@pytest.mark.slow
def test_build_records_every_matcher(built: dict) -> None:
    from mlflow.tracking import MlflowClient

    from data_prep.dataset import dataset_fingerprint
    from jobs.stages.matchers import sha256_file

    out, content = built["out"], built["json"]
    assert content["data"]["seed"] == 2_000_000
    assert content["data"]["fingerprint"] == dataset_fingerprint(out / "train")
    assert content["evaluation"] == {"seed": 1_000_000, "pairs": 40, "identities": 12}
    records = content["matchers"]
    assert [r["name"] for r in records] == ["tiny-cos", "small-arc"]
    expected = {
        "tiny-cos": ("iresnet_tiny", "cosface", 0.3, 32, 1),
        "small-arc": ("iresnet_small", "arcface", 0.5, 48, 2),
    }
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for record in records:
        name = record["name"]
        assert (
            record["backbone"],
            record["margin"],
            record["margin_value"],
            record["embedding_size"],
            record["seed"],
        ) == expected[name]
        assert record["onnx"] == f"{name}.onnx" and record["global_step"] == STEPS
        assert record["sha256"] == sha256_file(out / record["onnx"])
        assert record["data_fingerprint"] == content["data"]["fingerprint"]
        assert 0.0 <= record["mixed_accuracy"] <= 1.0 and 0.0 <= record["clean_accuracy"] <= 1.0
        assert record["config"]["loss"]["mode"] == "fr" and record["config"]["data"]["reg_batch"] == 0
        assert record["config"]["run"]["seed"] == record["config"]["data"]["seed"] == record["seed"]
        assert Path(record["checkpoint"]).is_file() and record["train_seconds"] > 0
        assert Path(record["checkpoint"]).parts[-3] == f"{name}-{record['recipe']}"
        run = client.get_run(record["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == f"matcher-{name}"
        tags = run.data.tags
        assert tags["igfiqa.role"] == "matcher" and tags["igfiqa.matcher"] == name
        assert tags["dataset_fingerprint"] == record["data_fingerprint"] and tags["loss_mode"] == "fr"
        assert tags["onnx_sha256"] == record["sha256"]
        assert run.data.metrics["matcher.clean_accuracy"] == pytest.approx(record["clean_accuracy"])
    assert records[0]["recipe"] != records[1]["recipe"]


@pytest.mark.slow
def test_a_second_call_reuses_everything_and_a_changed_recipe_rebuilds_that_matcher_only(
    built: dict, capsys: pytest.CaptureFixture
) -> None:
    spec, out = built["spec"], built["out"]
    before = _mtimes(out)
    capsys.readouterr()
    assert main(["matchers", "build", str(spec), "--out", str(out), "--nproc", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-cos: built before, reused" in printed and "small-arc: built before, reused" in printed
    assert _mtimes(out) == before  # nothing trained, saved or exported again
    assert json.loads((out / "matchers.json").read_text()) == built["json"]
    for name in ("tiny-cos", "small-arc"):
        assert f"{name} " in printed  # the table

    # another learning rate for the second matcher: it alone trains again, in a run dir of its own
    changed = out.parent / "changed.yaml"
    changed.write_text(_spec_text(second_lr=0.05))
    assert main(["matchers", "build", str(changed), "--out", str(out), "--nproc", "1"]) == 0
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if "tiny-cos" in k} == {
        k: v for k, v in before.items() if "tiny-cos" in k
    }
    assert after["small-arc.onnx"] != before["small-arc.onnx"]
    records = {r["name"]: r for r in json.loads((out / "matchers.json").read_text())["matchers"]}
    old = {r["name"]: r for r in built["json"]["matchers"]}
    assert records["tiny-cos"] == old["tiny-cos"]
    assert records["small-arc"]["recipe"] != old["small-arc"]["recipe"]
    assert records["small-arc"]["config"]["optim"]["lr"] == 0.05
    assert Path(old["small-arc"]["checkpoint"]).is_file()  # the old run stays where it was

    # an altered ONNX file is exported again from the recorded training, nothing retrained
    onnx = out / "tiny-cos.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    runs_before = {k: v for k, v in _mtimes(out).items() if k.startswith("runs")}
    assert (
        main(["matchers", "build", str(changed), "--out", str(out), "--only", "tiny-cos", "--nproc", "1"])
        == 0
    )
    assert {k: v for k, v in _mtimes(out).items() if k.startswith("runs")} == runs_before
    records = {r["name"]: r for r in json.loads((out / "matchers.json").read_text())["matchers"]}
    assert records["tiny-cos"]["sha256"] == old["tiny-cos"]["sha256"]  # the same weights, the same bytes


@pytest.mark.slow
def test_the_onnx_file_works_as_fr_model_in_igfiqa_eval(built: dict, tmp_path: Path) -> None:
    """`igfiqa eval CKPT --data VAL --fr-model M.onnx`: the comparisons come from the matcher, whose
    clean accuracy there is the one matchers.json records (same embeddings, one forward pass)."""
    out = built["out"]
    record = built["json"]["matchers"][0]
    val = out / "sets" / "seed-1000000" / "val"
    report = tmp_path / "eval"
    checkpoint = built["json"]["matchers"][1]["checkpoint"]  # any model scores quality
    assert (
        main(
            [
                "eval",
                checkpoint,
                "--data",
                str(val),
                "--fr-model",
                str(out / record["onnx"]),
                "--out",
                str(report),
            ]
        )
        == 0
    )
    import pandas as pd

    accuracy = pd.read_csv(report / "verification.csv").set_index("dataset")["accuracy"]
    assert accuracy["clean"] == pytest.approx(record["clean_accuracy"], abs=1e-9)
    assert accuracy["mixed"] == pytest.approx(record["mixed_accuracy"], abs=1e-9)
    assert "clean (own backbone)" in accuracy.index  # the checkpoint's own comparisons, beside


@pytest.mark.slow
def test_list_prints_the_table(built: dict, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["matchers", "list", "--out", str(built["out"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "backbone", "margin", "dim"]
    assert lines[1].split()[:5] == ["tiny-cos", "iresnet_tiny", "cosface", "0.3", "32"]
    assert "seed 1000000 (40 pairs each)" in lines[-1]
    assert main(["matchers", "list", "--out", os.fspath(built["out"].parent / "nothing")]) == 0
    assert "no matchers in" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.slurm
def test_a_matcher_trains_on_slurm_with_a_cluster_profile(slurm_cluster, tmp_path: Path) -> None:
    """`build_matchers(..., launch=MatcherLaunch(cluster=PROFILE))`: the training is a SLURM job of
    the local cluster (2 tasks), tagged as a matcher like one trained here."""
    from mlflow.tracking import MlflowClient

    from jobs.stages.matcher_spec import load_matchers_spec
    from jobs.stages.matchers import MatcherLaunch, build_matchers, read_matchers

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(_spec_text())
    spec = load_matchers_spec(spec_path)
    out = tmp_path / "out"
    lines: list[str] = []
    (record,) = build_matchers(
        spec,
        out,
        only=["tiny-cos"],
        launch=MatcherLaunch(cluster=REPO / "slurm" / "clusters" / "local.yaml"),
        say=lines.append,
        job_log=open(os.devnull, "w"),  # noqa: SIM115 - the job's log is not under test
    )
    assert record.where.startswith("on SLURM (job ") and "2 tasks" in record.where, lines
    assert record.global_step == STEPS and read_matchers(out) == [record]
    run = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(record.mlflow_run_id)
    assert run.data.tags["igfiqa.role"] == "matcher" and run.data.tags["world_size"] == "2"
    assert "slurm_job_id" in run.data.tags
