"""`igfiqa study run | status | report` end to end on a tiny spec: 2 arms × 2 seeds of a few steps.

Real parts: the synthetic generator and conversion, a reference matcher built through
`igfiqa matchers build`'s stage, DALI on the CPU, the trainer, ONNX and onnxruntime, the
all-vs-all evaluation, MLflow on sqlite, spawned worker processes. The study is killed at a fault
point in the middle of a training (its whole process group, as a SIGKILL), then resumed: the
measured run is left alone, the killed training resumes from its checkpoint in its MLflow run, and
the report carries every number. A second test runs the same spec on the local SLURM cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
IGFIQA = Path(sys.executable).parent / "igfiqa"
STEPS = 6
RUNS = ["CR(S-)-s0", "IG(S)-s0", "CR(S-)-s1", "IG(S)-s1"]


def write_spec(folder: Path, *, cluster: str = "") -> Path:
    """A tiny study spec and its one-matcher matchers spec in FOLDER."""
    base = REPO / "configs" / "tiny_cpu.yaml"
    (folder / "matchers.yaml").write_text(
        f"""
data: {{identities: 16, images_per_identity: 5, seed: 2000000}}
evaluation: {{seed: 1000000, pairs: 40, identities: 12}}
matchers:
  - name: tiny-cos
    config: {base}
    seed: 1
    overrides: [data.fr_batch=16, optim.max_steps=3, run.checkpoint_every_steps=0, model.embedding_size=32]
"""
    )
    spec = folder / "study.yaml"
    spec.write_text(
        f"""
name: tiny
out: out
config: {base}
overrides: [data.fr_batch=8, data.reg_batch=8, model.embedding_size=32, optim.max_steps={STEPS},
            run.checkpoint_every_steps=2, run.checkpoint_every_minutes=0, run.log_every=1]
training_data: {{synthetic: {{identities: 20, images_per_identity: 6, seed: 0}}}}
seeds: [0, 1]
arms:
  CR(S-): [loss.mode=cr, data.augment.p_rescale=0, data.augment.p_erase=0, data.augment.p_color=0]
  IG(S): []
evaluation:
  identity_sets: [{{name: unseen, identities: 12, images_per_identity: 4, seed: 3000000}}]
  verification: {{seed: 3000000, pairs: 40, identities: 12}}
  fmrs: [0.01]
matchers: {{spec: matchers.yaml, out: matchers}}
endpoint: {{metric: edc_ratio, fmr: 0.01}}
hypotheses:
  - {{name: H1b, arm: IG(S), baseline: CR(S-)}}
  - {{name: FR, arm: IG(S), baseline: CR(S-), endpoint: fr_fnmr}}
bootstrap: {{draws: 1000, seed: 0}}
launch: {{cluster: "{cluster}"}}
"""
    )
    return spec


def igfiqa(args: list[str], *, fault: str = "", timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "IGFIQA_STUDY_FAULT")}
    if fault:
        env["IGFIQA_STUDY_FAULT"] = fault
    # its own session: a fault point kills the study's process group, not pytest's
    return subprocess.run(
        [str(IGFIQA), *args], capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True
    )


def status(spec: Path) -> dict[str, list[str]]:
    done = igfiqa(["study", "status", str(spec)])
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:-1]]
    return {row[0]: row[1:] for row in rows}


@pytest.mark.slow
def test_a_killed_study_resumes_and_reports_every_number(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    killed = igfiqa(["study", "run", str(spec), "--local", "--workers", "1"], fault="IG(S)-s0@step-4")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    states = status(spec)
    assert list(states) == RUNS
    assert states["CR(S-)-s0"][:3] == ["CR(S-)", "0", "measured"]
    _arm, _seed, state, step = states["IG(S)-s0"][:4]
    assert (state, 2 <= int(step) < STEPS) == ("pending", True), states["IG(S)-s0"]
    assert [states[r][2] for r in RUNS[2:]] == ["pending", "pending"]
    measured_first = (out / "runs" / "CR(S-)-s0" / "measurements.json").stat().st_mtime_ns
    first_run_id = json.loads(
        json.dumps(
            __import__("torch").load(
                out / "runs" / "IG(S)-s0" / "checkpoints" / "last.ckpt", weights_only=True
            )["mlflow_run_id"]
        )
    )

    resumed = igfiqa(["study", "run", str(spec), "--local", "--workers", "2"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert all(state[2] == "measured" and state[3] == str(STEPS) for state in status(spec).values())
    assert (out / "runs" / "CR(S-)-s0" / "measurements.json").stat().st_mtime_ns == measured_first
    marker = json.loads((out / "runs" / "IG(S)-s0" / "study-train.json").read_text())
    assert marker["mlflow_run_id"] == first_run_id and marker["global_step"] == STEPS

    measured = json.loads((out / "runs" / "IG(S)-s1" / "measurements.json").read_text())
    rows = {(r["set"], r["matcher"], r["method"]): r for r in measured["rows"]}
    for key in (
        ("unseen", "tiny-cos", "model"),
        ("unseen", "tiny-cos", "oracle"),
        ("unseen", "own backbone", "model"),
    ):
        assert key in rows and rows[key]["edc_ratio"] > 0 and rows[key]["num_nonmated"] > 1000, key
    assert {(v["set"], v["matcher"]) for v in measured["verification"]} >= {
        ("clean", "own backbone"),
        ("mixed", "tiny-cos"),
    }
    assert -100 <= measured["ground_truth"]["lowvar_overrating"] <= 100
    assert len(measured["ground_truth"]["weights"]) == 20

    reported = igfiqa(["study", "report", str(spec), "--docs-img", str(tmp_path / "img")])
    assert reported.returncode == 0, reported.stdout + reported.stderr
    tables = (out / "report" / "tables.md").read_text()
    assert "# Study tiny: 4 of 4 runs measured" in tables
    assert "bootstrap 95 % CI (1000 draws, seed 0)" in tables and "H1b: IG(S) − CR(S-)" in tables
    differences = json.loads((out / "report" / "summary.json").read_text())["differences"]
    by_matcher = [d for d in differences if d["hypothesis"] == "H1b" and d["matcher"] == "tiny-cos"]
    # the identity set decides (primary); the verification sets' 40 pairs do not resolve FMR 0.01
    assert {d["set"]: d["secondary"] for d in by_matcher} == {"unseen": False}
    assert "clean at FMR 0.01 (20 non-mated pairs)" in tables and "mixed at FMR 0.01" in tables
    primary = [d for d in by_matcher if not d["secondary"]]
    assert (
        len(primary) == 1
        and primary[0]["seeds"] == 2
        and primary[0]["ci_low"] <= primary[0]["mean_difference"] <= primary[0]["ci_high"]
    )
    # the explanation by degradation kind: the matcher's failure rate per kind, the arms' percentiles
    assert "mated comparisons each matcher rejects (set unseen, FMR 0.01)" in tables
    kinds = tables.split("mean quality percentile of each kind")[1].split("## ")[0]
    header = kinds.split("\n")[2]
    assert "| none |" in header and "| rho:tiny-cos |" in header, header
    assert all(f"| {row} |" in kinds for row in ("CR(S-)", "IG(S)", "oracle (−strength)")), kinds
    assert "| H1b: IG(S) − CR(S-) |" in tables.split("paired differences of those figures")[1]
    assert "FR: IG(S)" not in tables.split("paired differences of those figures")[1]
    for plot in ("fig5_unseen_fmr0.01.png", "differences.png", "weights.png", "kinds_unseen.png"):
        assert (out / "report" / plot).stat().st_size > 1000
        assert (tmp_path / "img" / f"study_tiny_{plot}").is_file()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = json.loads((out / "report" / "parent_run.json").read_text())["run_id"]
    children = client.search_runs(
        [client.get_experiment_by_name("igfiqa-study-tiny").experiment_id],
        f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert sorted(r.info.run_name for r in children) == sorted(f"study-{r}" for r in RUNS)
    evals = client.search_runs(
        [client.get_experiment_by_name("igfiqa-study-tiny").experiment_id],
        f"tags.mlflow.parentRunId = '{marker['mlflow_run_id']}'",
    )
    assert len(evals) == 2  # the identity sets' folder and the verification sets' folder


@pytest.mark.slow
@pytest.mark.long  # ~2 min: `make test` runs it; CI runs the local study end to end above
@pytest.mark.slurm
def test_a_study_runs_as_one_slurm_array(slurm_cluster, tmp_path: Path) -> None:
    """The same spec on the local cluster: the matcher trains there too, every run is one array task,
    and a second call submits nothing."""
    spec = write_spec(tmp_path, cluster=str(REPO / "slurm" / "clusters" / "local.yaml"))
    out = tmp_path / "out"
    done = igfiqa(["study", "run", str(spec)], timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted array job" in done.stdout
    assert all(state[2] == "measured" for state in status(spec).values())
    for run in RUNS:
        marker = json.loads((out / "runs" / run / "study-train.json").read_text())
        assert marker["where"].startswith("on SLURM (job ") and marker["global_step"] == STEPS
        assert (out / "runs" / run / "study-job.json").is_file()
    again = igfiqa(["study", "run", str(spec)])
    assert again.returncode == 0 and "submitted array job" not in again.stdout, again.stdout
