"""`igfiqa demo` end to end: synthetic data → shards → training (local SLURM, or here) → evaluation →
reference matcher → efficacy (primary protocol, then the secondary figures) → MLflow.

The slow tests run the real command line on a small dataset and check what a user is told to
look at: the PNGs, the results table, the MLflow training run and its eval child run, the primary
protocol's figures by the session's tiny matcher (`tiny_matcher_spec`, reused, not trained here);
a second run must reuse every stage (no new job, no retraining, no new evaluation).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.cluster import profile_from_dict
from jobs.slurm import slurm_unavailable_reason
from jobs.stages.matchers import sha256_file
from tests.train_fixtures import TINY_MATCHER, new_mlflow_store

IDENTITIES = "40"
# the local-training test: what it checks does not depend on the size of the data
SMALL_IDENTITIES, SMALL_IMAGES = "20", "10"
STEPS = "8"
# a small efficacy stage: its mechanics, not the recipe's figures; 50 x 10 images give 122,500
# non-mated pairs, the fewest at this size that resolve FMR 1e-4 (>= 10 false matches)
PRIMARY_IDENTITIES, PRIMARY_IMAGES = 50, 10
FRESH = (
    "--fresh-pairs",
    "400",
    "--primary-identities",
    str(PRIMARY_IDENTITIES),
    "--primary-images-per-identity",
    str(PRIMARY_IMAGES),
)
STAGES = {"synth", "convert", "bins", "preview", "train", "evaluate", "matcher", "efficacy"}


def matcher_args(spec_and_out: tuple[Path, Path]) -> tuple[str, ...]:
    """The demo's options that point it at the session's tiny matcher."""
    spec, out = spec_and_out
    return ("--matchers-spec", str(spec), "--matchers-out", str(out), "--matcher", TINY_MATCHER)


def run_demo(
    out: Path, *extra: str, cwd: Path, identities: str = IDENTITIES
) -> subprocess.CompletedProcess[str]:
    """The real `igfiqa demo` in a subprocess (as `make demo` runs it)."""
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "demo",
        "--out",
        str(out),
        "--identities",
        identities,
        *extra,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, timeout=600, stdin=subprocess.DEVNULL
    )


def mlflow_runs(out: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("igfiqa")
    assert experiment is not None, "the demo logged no MLflow experiment 'igfiqa'"
    return client.search_runs([experiment.experiment_id])


def run_count(out: Path) -> int:
    """MLflow runs of every experiment in the demo's store (training, eval, data stages)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids))


def stage_lines(stdout: str) -> dict[str, str]:
    """{stage: its closing line} from the `[demo i/8] stage: done|reused in ...` lines."""
    found = re.findall(r"^\[demo \d/8\] (\w+): ((?:done|reused) in .*)$", stdout, flags=re.MULTILINE)
    return dict(found)


def check_outputs(out: Path, stdout: str, identities: str = IDENTITIES) -> tuple[str, str]:
    """Everything the summary points at exists; returns (training run id, eval run id)."""
    pngs = [
        out / "augmentation_preview.png",
        out / "eval" / "quality_clean.png",
        out / "eval" / "quality_mixed.png",
        out / "run" / "plots" / "class_weights.png",
        out / "run" / "plots" / "training_curves.png",
    ]
    for png in pngs:
        assert png.is_file() and png.stat().st_size > 1000, f"{png} missing or empty"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
        assert str(png.relative_to(out)) in stdout, f"the summary does not point at {png}"
    table = (out / "eval" / "table.md").read_text()
    # one FMR the small sets resolve (1e-1) on two sets, and the random-quality reference beside it
    number = r"\*{0,2}(\d\.\d{4})\*{0,2}"
    for method in ("IG-FIQA", "random"):
        rows = re.findall(rf"^\| {method} \| {number} \| {number} \|$", table, re.M)
        assert len(rows) == 2, f"expected ERC and EDC rows of {method} with 2 numbers each:\n{table}"
        assert all(0.0 <= float(v) <= 1.0 for row in rows for v in row)
    assert "clean FMR=1e-1" in table
    assert "| IG-FIQA |" in stdout, "the summary does not print the table"
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in stdout

    runs = mlflow_runs(out)
    train_runs = [r for r in runs if r.data.tags.get("kind") == "train"]
    assert len(train_runs) == 1, [r.data.tags for r in runs]
    train = train_runs[0]
    assert train.info.status == "FINISHED"
    assert train.data.metrics["loss_arc"] > 0
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == train.info.run_id]
    assert len(children) == 1 and children[0].data.tags.get("stage") == "eval"
    child = children[0]
    assert child.info.status == "FINISHED"
    assert 0.0 <= child.data.metrics["clean.accuracy"] <= 1.0
    assert "clean.IG-FIQA.erc_auc.fmr_1e-1" in child.data.metrics  # the FMR the small sets resolve
    assert "mixed.IG-FIQA.edc_pauc_vs_random.fmr_1e-1" in child.data.metrics
    assert train.info.run_id in stdout and child.info.run_id in stdout
    check_prep_lineage(out, train.data.tags["dataset_fingerprint"], child.data.tags, identities)
    return train.info.run_id, child.info.run_id


def check_prep_lineage(out: Path, train_fingerprint: str, eval_tags: dict[str, str], identities: str) -> None:
    """The data stages' runs carry the fingerprints the training and eval runs name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = {}
    for stage in ("synth", "convert", "bins"):
        experiment = client.get_experiment_by_name(f"igfiqa-{stage}")
        assert experiment is not None, f"no {stage} run was logged"
        found = client.search_runs([experiment.experiment_id])
        assert len(found) == 1 and found[0].info.status == "FINISHED"
        runs[stage] = found[0]
    assert runs["convert"].data.tags["dataset_fingerprint"] == train_fingerprint
    for name in ("clean", "mixed"):
        key = f"dataset_fingerprint.{name}"
        assert runs["bins"].data.tags[key] == eval_tags[key]
    assert runs["synth"].data.params["identities"] == identities


# what a second run writes again: the summary, the ground-truth plot, and MLflow's store (read)
REWRITTEN = {"SUMMARY.txt", "run/plots/class_weights_vs_truth.png", "mlflow.db"}


def file_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """{path under `out`: (size, mtime in ns)} of every file but those a second run rewrites."""
    stamps = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if path.is_file() and name not in REWRITTEN:
            stamps[name] = (path.stat().st_size, path.stat().st_mtime_ns)
    return stamps


def check_second_run_reuses(out: Path, first_stdout: str, cwd: Path, matchers: tuple[Path, Path]) -> None:
    """Run again: every stage reused; no file of the first run written again or added, so no
    new job, checkpoint, shard, evaluation, plot or matcher; no new MLflow run."""
    stamps = file_stamps(out)
    assert any(name.startswith("run/checkpoints/") for name in stamps) and any(
        name.startswith("run/submitit/") for name in stamps
    )
    runs_before = run_count(out)
    matcher_files = matcher_stamps(matchers[1])
    again = run_demo(out, "--steps", STEPS, *FRESH, *matcher_args(matchers), cwd=cwd)
    assert again.returncode == 0, again.stdout + again.stderr
    stages = stage_lines(again.stdout)
    assert set(stages) == STAGES, again.stdout
    assert all(line.startswith("reused") for line in stages.values()), stages
    assert f"{TINY_MATCHER} built before, reused" in stages["matcher"]
    after = file_stamps(out)
    assert sorted(set(after) - set(stamps)) == [], "files added by the second run"
    assert [name for name in stamps if after.get(name) != stamps[name]] == [], "files rewritten"
    assert run_count(out) == runs_before
    assert matcher_stamps(matchers[1]) == matcher_files, "the matcher's folder was written to"
    # the same table is printed again
    table_line = next(line for line in first_stdout.splitlines() if line.startswith("| IG-FIQA |"))
    assert table_line in again.stdout
    for label in ("EDC pAUC / random quality", "EDC pAUC  ", "ERC AUC  "):
        efficacy_line = next(line for line in first_stdout.splitlines() if label in line)
        assert efficacy_line in again.stdout


def matcher_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """`file_stamps` of a matchers folder, but its lock (taken by every build, reused or not)."""
    return {name: stamp for name, stamp in file_stamps(out).items() if not name.startswith(".prep/")}


def check_efficacy(out: Path, stdout: str, train_run_id: str, eval_run_id: str, matchers: Path) -> None:
    """The primary protocol's figures, then the secondary ones: in the summary, in the marker file,
    as fresh.primary.* / fresh.secondary.* metrics in MLflow."""
    from mlflow.tracking import MlflowClient

    seed, primary_seed = 1_000_000, 3_000_000  # the training seed 0 + the offsets: never trained on
    recorded = json.loads((out / "eval" / "demo-efficacy.json").read_text())
    figures, primary = recorded["figures"], recorded["primary"]
    # the primary protocol: identity-labelled set, one forward pass, the matcher's comparisons
    assert primary["seed"] == primary_seed and primary["matcher"] == TINY_MATCHER
    assert primary["matcher_sha256"] == sha256_file(matchers / f"{TINY_MATCHER}.onnx")
    assert primary["flip"] is False and primary["fmrs"] == [1e-3, 1e-4] and primary["discard_limit"] == 0.2
    images = PRIMARY_IDENTITIES * PRIMARY_IMAGES
    mated = PRIMARY_IDENTITIES * PRIMARY_IMAGES * (PRIMARY_IMAGES - 1) // 2
    assert figures["primary.mated"] == mated
    assert figures["primary.nonmated"] == images * (images - 1) // 2 - mated
    assert figures["primary.nonmated"] * 1e-4 >= 10
    assert figures["primary.flip"] == 0.0
    primary_at = stdout.index("PRIMARY efficacy protocol")
    assert f"identity-labelled set of seed {primary_seed}" in stdout
    assert f"{PRIMARY_IDENTITIES} identities x {PRIMARY_IMAGES} images" in stdout
    assert "quality from one forward pass (no flip)" in stdout and "mean of 20 draws" in stdout
    for fmr in ("1e-3", "1e-4"):
        value = {
            name: figures[f"primary.{TINY_MATCHER}.{name}_fmr{fmr}"]
            for name in (
                "edc_pauc",
                "random_edc_pauc",
                "edc_ratio",
                "erc_auc",
                "random_erc_auc",
                "erc_ratio",
                "oracle_edc_pauc",
                "oracle_edc_ratio",
                "oracle_erc_ratio",
                "below_resolution",
                "achieved_fmr",
                "fnmr",
            )
        }
        assert all(math.isfinite(v) for v in value.values()), value
        assert value["below_resolution"] == 0.0 and 0 < value["achieved_fmr"] <= float(fmr)
        assert value["random_edc_pauc"] > 0 and value["random_erc_auc"] > 0
        assert value["edc_ratio"] == pytest.approx(value["edc_pauc"] / value["random_edc_pauc"])
        assert value["erc_ratio"] == pytest.approx(value["erc_auc"] / value["random_erc_auc"])
        assert value["oracle_edc_ratio"] == pytest.approx(value["oracle_edc_pauc"] / value["random_edc_pauc"])
        # quality = -strength ranks the degraded images' failures first: better than random where
        # the matcher verifies anything. The tiny matcher does at FMR 1e-3 (FNMR ~0.8) but not at
        # 1e-4 (FNMR 1: every pair fails, each curve is flat and every ratio is 1); the real
        # matcher's figures at both FMRs are in README's demo section.
        if fmr == "1e-3":
            assert value["fnmr"] < 1.0, value
            assert value["oracle_edc_ratio"] < 1.0 and value["oracle_erc_ratio"] < 1.0, value
        else:
            assert value["oracle_edc_ratio"] <= 1.0 + 1e-9 and value["oracle_erc_ratio"] <= 1.0 + 1e-9, value
        assert f"matcher {TINY_MATCHER}, FMR {fmr} " in stdout
        printed = f"{value['edc_ratio']:8.3f} {1:8.3f} {value['oracle_edc_ratio']:8.3f}"
        assert printed in stdout, printed
    assert (
        out / "fresh" / f"identity-seed-{primary_seed}-50x10" / "sets" / "unseen" / "dataset.json"
    ).is_file()
    assert list((out / "eval" / "primary").rglob("results.json")), "no report of the primary evaluation"
    # the secondary figures, after the primary ones and labelled: own backbone, flip, fresh sets
    secondary_at = stdout.index("secondary (labelled; not the protocol): the model's OWN backbone")
    assert primary_at < secondary_at
    assert f"on fresh clean/mixed sets of seed {seed} (400 pairs each" in stdout
    assert recorded["seed"] == seed and figures["secondary.pairs"] == 400
    assert recorded["flip"] is True and figures["secondary.flip"] == 1.0 and "mirror image (flip)" in stdout
    assert (
        0.5 <= figures["secondary.clean_accuracy"] <= 1.0
        and -1.0 <= figures["secondary.mixed_spearman"] <= 1.0
    )
    assert figures["secondary.edc_ratio"] > 0 and figures["secondary.oracle_ratio"] > 0
    assert f"{100 * figures['secondary.clean_accuracy']:6.2f} %" in stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for run_id in (train_run_id, eval_run_id):
        run = client.get_run(run_id)
        for name in (
            f"primary.{TINY_MATCHER}.edc_ratio_fmr1e-3",
            f"primary.{TINY_MATCHER}.edc_ratio_fmr1e-4",
            f"primary.{TINY_MATCHER}.oracle_erc_ratio_fmr1e-4",
            "primary.nonmated",
            "secondary.clean_accuracy",
            "secondary.edc_ratio",
        ):
            assert run.data.metrics[f"fresh.{name}"] == pytest.approx(figures[name]), (run_id, name)
        assert run.data.tags["fresh.primary.matcher"] == TINY_MATCHER
        assert run.data.tags["fresh.primary.seed"] == str(primary_seed)
    assert (out / "fresh" / f"seed-{seed}" / "val" / "mixed" / "dataset.json").is_file()


@pytest.mark.slow
@pytest.mark.slurm
def test_demo_on_the_local_cluster_then_reused(
    slurm_cluster, mlflow_store_template: Path, tiny_matcher_spec: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    new_mlflow_store(mlflow_store_template, out)
    matcher_files = matcher_stamps(tiny_matcher_spec[1])
    first = run_demo(out, "--steps", STEPS, *FRESH, *matcher_args(tiny_matcher_spec), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert re.search(r"trained 8 steps on SLURM \(job \d+, 2 tasks, cluster profile local\)", first.stdout)
    assert "training HERE" not in first.stdout
    assert all(
        line.startswith("done") for name, line in stage_lines(first.stdout).items() if name != "matcher"
    )
    assert re.search(r"^\s+\| .*step 8/8", first.stdout, re.M), "the job's log was not followed"
    train_marker = json.loads((out / "run" / "demo-train.json").read_text())
    assert train_marker["global_step"] == 8 and Path(train_marker["checkpoint"]).is_file()
    train_run_id, eval_run_id = check_outputs(out, first.stdout)
    assert f"{TINY_MATCHER} built before, reused" in stage_lines(first.stdout)["matcher"]
    assert matcher_stamps(tiny_matcher_spec[1]) == matcher_files, "the matcher's folder was written to"
    check_efficacy(out, first.stdout, train_run_id, eval_run_id, tiny_matcher_spec[1])
    assert (out / "SUMMARY.txt").read_text().strip() in first.stdout
    check_second_run_reuses(out, first.stdout, tmp_path, tiny_matcher_spec)


@pytest.mark.slow
def test_demo_trains_here_with_local_and_says_why(mlflow_store_template: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    new_mlflow_store(mlflow_store_template, out)
    args = (
        "--steps",
        "4",
        "--local",
        "--nproc",
        "1",
        "--fresh-pairs",
        "0",
        "--images-per-identity",
        SMALL_IMAGES,
    )
    first = run_demo(out, *args, cwd=tmp_path, identities=SMALL_IDENTITIES)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "training HERE, not on SLURM, because --local was given" in first.stdout
    assert "trained 4 steps here with 1 process, not on SLURM because --local was given" in first.stdout
    stages = stage_lines(first.stdout)
    assert set(stages) == STAGES
    assert stages["efficacy"].startswith("reused in") and stages["matcher"].startswith("reused in")
    assert (
        "skipped (--fresh-pairs 0)" in stages["matcher"] and "skipped (--fresh-pairs 0)" in stages["efficacy"]
    )
    assert "on fresh clean/mixed sets" not in first.stdout and "PRIMARY" not in first.stdout
    check_outputs(out, first.stdout, SMALL_IDENTITIES)


def test_demo_refuses_a_folder_synthesized_with_other_settings(tmp_path: Path, capsys) -> None:
    synth = tmp_path / "demo" / "synth"
    synth.mkdir(parents=True)
    (synth / "synth.json").write_text(json.dumps({"identities": 200, "images_per_identity": 12, "seed": 0}))
    status = main(["demo", "--out", str(tmp_path / "demo"), "--identities", "40", "--local"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{synth} was synthesized with other settings: identities 200 (asked 40)" in err
    assert not (tmp_path / "demo" / "train").exists()


def test_demo_rejects_bad_sizes(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "-1"]) == 2
    assert "--steps must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_refuses_a_primary_set_that_cannot_measure_the_protocol(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), "--primary-identities", "20"]) == 2
    assert (
        "--primary-identities 20 x --primary-images-per-identity 10 give 19,000 non-mated pairs: "
        "FMR 1e-4 needs 100,000 (FMR x non-mated >= 10)"
    ) in capsys.readouterr().err
    # --seed -1,000,000 puts the primary set on the matchers' training seed
    assert main(["demo", "--out", str(out), "--seed", "-1000000"]) == 2
    assert "the primary set's seed 2000000 is the matchers' training data seed" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--matcher", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--matcher nope: no such matcher in " in err
    assert "synthetic.yaml (it has cosface-tiny, arcface-small)" in err
    assert main(["demo", "--out", str(out), "--matchers-spec", str(tmp_path / "none.yaml")]) == 2
    assert f"--matchers-spec {tmp_path / 'none.yaml'}: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_no_slurm_on_path_is_a_reason_to_train_here(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo, sbatch or sacct here
    profile = profile_from_dict({"name": "local", "tasks_per_node": 2}, path="local.yaml")
    reason = slurm_unavailable_reason(profile)
    assert reason is not None and reason.startswith(
        "SLURM is not installed here (sinfo, sbatch, sacct not on PATH)"
    )


def test_a_fake_sinfo_down_node_is_reported(tmp_path: Path, monkeypatch) -> None:
    for tool, script in {
        "sinfo": "#!/bin/sh\necho 'down* 2'\n",
        "sbatch": "#!/bin/sh\nexit 1\n",
        "sacct": "#!/bin/sh\nexit 0\n",
    }.items():
        (tmp_path / tool).write_text(script)
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    profile = profile_from_dict({"name": "local", "partition": "debug", "tasks_per_node": 2}, path="x.yaml")
    reason = slurm_unavailable_reason(profile)
    assert reason is not None and reason.startswith(
        "no usable SLURM node in partition debug (node states: down*)"
    )
    (tmp_path / "sinfo").write_text("#!/bin/sh\necho 'idle 1'\n")
    assert "asks for 2 CPUs per node, the largest node of partition debug has 1" in slurm_unavailable_reason(
        profile
    )
    (tmp_path / "sinfo").write_text("#!/bin/sh\necho 'idle 2'\n")
    assert slurm_unavailable_reason(profile) is None
