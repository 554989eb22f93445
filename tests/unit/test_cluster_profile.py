"""Cluster profiles: the shipped ones load, bad ones are refused naming file and key, and the
profile → submitit mapping produces the sbatch script it should (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import jobs.cluster
from jobs.cluster import (
    ProfileError,
    executor_parameters,
    load_profile,
    make_executor,
    profile_from_dict,
    select_cluster,
)
from jobs.launch import with_tasks_per_node
from pipeline.config import ConfigError
from pipeline.parallel.env import DEFAULT_COLLECTIVE_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "slurm" / "clusters"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def _sbatch_text(profile, tmp_path: Path, **kwargs) -> str:
    executor = make_executor(profile, tmp_path / "logs", job_name="unit", **kwargs)
    return executor._executor._make_submission_file_text("python -m job", "uid")


def test_shipped_profiles_load() -> None:
    local = load_profile(PROFILES / "local.yaml")
    assert (local.executor, local.partition, local.nodes, local.tasks_per_node, local.gpus_per_node) == (
        "slurm",
        "debug",
        1,
        2,
        0,
    )
    example = load_profile(PROFILES / "example-multinode-gpu.yaml")
    assert example.world_size == example.nodes * example.gpus_per_node == 32
    assert example.env["NCCL_SOCKET_IFNAME"] == "ib0"


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("nodez: 2\n", "nodez", "unknown key"),
        ("nodes: 0\n", "nodes", "must be >= 1"),
        ("nodes: two\n", "nodes", "expected an integer"),
        ("cpus_per_task: true\n", "cpus_per_task", "expected an integer"),
        ("gpus_per_node: 4\ntasks_per_node: 2\n", "tasks_per_node", "one task per GPU"),
        ("time_min: 1\nsignal_delay_s: 60\n", "signal_delay_s", "not shorter than time_min"),
        ("mem_gb: -1\n", "mem_gb", "must be >= 0, got -1"),
        ("mem_gb: lots\n", "mem_gb", "expected a number or null, got str 'lots'"),
        ("executor: kubernetes\n", "executor", "is not one of"),
        ("gpu_request: cards\n", "gpu_request", "is not one of"),
        ("partition: ''\n", "partition", "non-empty string"),
        ("env:\n  1BAD: x\n", "env.1BAD", "not a valid environment variable name"),
        ("env:\n  A: [1, 2]\n", "env.A", "expected a string, an integer, a number or true/false"),
        ("setup: module load cuda\n", "setup", "list of strings"),
        ("additional_parameters:\n  time: 10\n", "additional_parameters.time", "time_min"),
        (
            "additional_parameters:\n  ntasks-per-node: 3\n",
            "additional_parameters.ntasks-per-node",
            "tasks_per_node",
        ),
        ("exclusive: yes please\n", "exclusive", "true/false"),
        ("slurm_conf: etc/slurm.conf\n", "slurm_conf", "absolute path"),
        ("collective_timeout_s: 0\n", "collective_timeout_s", "must be >= 1"),
        ("collective_timeout_s: 1.5\n", "collective_timeout_s", "expected an integer"),
    ],
)
def test_bad_profiles_are_refused_naming_file_and_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert f": {key}:" in message
    assert why in message
    assert isinstance(info.value, ConfigError)  # the CLI prints these as one line, exit status 2


@pytest.mark.parametrize(
    ("text", "why"),
    [("- a\n- b\n", "top level must be a mapping"), ("a: [\n", "not valid YAML")],
)
def test_malformed_files_are_refused(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        load_profile(_write(tmp_path, text))


def test_profiles_are_read_by_the_bounded_loader(tmp_path: Path) -> None:
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    bomb += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    with pytest.raises(ProfileError, match="more than 64 aliases"):
        load_profile(_write(tmp_path, "\n".join(bomb) + "\n"))
    with pytest.raises(ProfileError, match="a cluster profile file is at most"):
        load_profile(_write(tmp_path, "name: " + "x" * (1 << 20) + "\n"))


def test_keys_with_nothing_under_them_are_empty_and_env_values_become_strings(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, "setup:\nenv:\n  OMP_NUM_THREADS: 8\n  X: true\nsrun_args:\n"))
    assert (profile.setup, profile.srun_args, profile.additional_parameters) == ((), (), {})
    assert profile.env == {"OMP_NUM_THREADS": "8", "X": "true"}
    assert profile.collective_timeout_s == DEFAULT_COLLECTIVE_TIMEOUT_S


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")


def test_gpu_profile_defaults_tasks_to_gpus_and_name_to_file(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, "gpus_per_node: 4\n"))
    assert profile.tasks_per_node == 4
    assert profile.name == "site"


def test_local_profile_sbatch_script(tmp_path: Path) -> None:
    text = _sbatch_text(load_profile(PROFILES / "local.yaml"), tmp_path, timeout_min=7)
    for line in (
        "#SBATCH --partition=debug",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --time=7",
        "#SBATCH --signal=USR2@30",
        "#SBATCH --job-name=unit",
        "export OMP_NUM_THREADS=1",
    ):
        assert line in text.splitlines(), line
    assert "--gpus-per-node" not in text and "--mem" not in text


def test_gpu_profile_sbatch_script(tmp_path: Path) -> None:
    profile = load_profile(PROFILES / "example-multinode-gpu.yaml")
    lines = _sbatch_text(profile, tmp_path, nodes=2).splitlines()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=0GB",
        "#SBATCH --exclusive",
        "#SBATCH --account=my-project",
        "#SBATCH --qos=normal",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --mail-type=END,FAIL",
        "module load cuda/12.4 nccl",
        "export NCCL_SOCKET_IFNAME=ib0",
    ):
        assert line in lines, line
    # the profile's env comes after its setup lines, so it wins over what `module load` sets
    assert lines.index("export NCCL_SOCKET_IFNAME=ib0") > lines.index("module load cuda/12.4 nccl")
    assert any(line.startswith("srun ") and "--cpu-bind=none" in line for line in lines)


def test_gres_request_and_quoted_env(tmp_path: Path) -> None:
    raw = {"gpus_per_node": 2, "gpu_request": "gres", "env": {"NCCL_IB_HCA": "=mlx5_0,mlx5_1", "X": "a b"}}
    profile = load_profile(_write(tmp_path, yaml.safe_dump(raw)))
    lines = _sbatch_text(profile, tmp_path).splitlines()
    assert "#SBATCH --gres=gpu:2" in lines
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in lines)
    assert "export X='a b'" in lines


def test_array_task_is_one_cpu_process(tmp_path: Path) -> None:
    profile = load_profile(PROFILES / "example-multinode-gpu.yaml")
    params = executor_parameters(profile, job_name="prep", array_task=True, array_parallelism=5)
    assert (params["nodes"], params["tasks_per_node"], params["cpus_per_task"]) == (1, 1, 1)
    assert "gpus_per_node" not in params and "mem_gb" not in params and "slurm_exclusive" not in params
    assert params["slurm_account"] == "my-project"  # the site's accounting still applies
    assert params["slurm_array_parallelism"] == 5


def test_nodes_override_and_limits(tmp_path: Path) -> None:
    profile = load_profile(PROFILES / "local.yaml")
    assert executor_parameters(profile, job_name="x", nodes=3)["nodes"] == 3
    with pytest.raises(ProfileError, match="nodes: must be >= 1"):
        executor_parameters(profile, job_name="x", nodes=0)
    with pytest.raises(ProfileError, match="not shorter than the time limit"):
        executor_parameters(profile, job_name="x", timeout_min=0)
    local = load_profile(_write(tmp_path, "executor: local\n"))
    with pytest.raises(ProfileError, match="one node only"):
        executor_parameters(local, job_name="x", nodes=2)


def test_two_node_profile_names_its_cluster_interface_and_timeout() -> None:
    profile = load_profile(PROFILES / "local-2node.yaml")
    assert (profile.slurm_conf, profile.partition, profile.nodes, profile.tasks_per_node) == (
        "/etc/slurm/local-2node/slurm.conf",
        "multi",
        2,
        1,
    )
    assert profile.env["GLOO_SOCKET_IFNAME"] == "igf0" and profile.collective_timeout_s == 60
    params = executor_parameters(profile, job_name="x")
    # srun and scontrol inside the job talk to the same cluster as the submitter
    assert "export SLURM_CONF=/etc/slurm/local-2node/slurm.conf" in params["slurm_setup"]
    assert "export GLOO_SOCKET_IFNAME=igf0" in params["slurm_setup"]
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    assert load_profile(PROFILES / "local.yaml").collective_timeout_s == 1800  # the default


def test_select_cluster_sets_and_restores_slurm_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=other\n")
    other = profile_from_dict({"slurm_conf": str(conf)}, path="other.yaml")
    default = profile_from_dict({}, path="default.yaml")
    for started_with in (None, "/etc/slurm/site-a.conf"):
        monkeypatch.setattr(jobs.cluster, "_DEFAULT_SLURM_CONF", started_with)
        monkeypatch.delenv("SLURM_CONF", raising=False)
        select_cluster(other)
        assert jobs.cluster.os.environ["SLURM_CONF"] == str(conf)
        select_cluster(default)  # back to what this process was started with
        assert jobs.cluster.os.environ.get("SLURM_CONF") == started_with
    select_cluster(profile_from_dict({"executor": "local", "slurm_conf": str(conf)}))  # no SLURM: no change
    assert jobs.cluster.os.environ.get("SLURM_CONF") == "/etc/slurm/site-a.conf"
    missing = profile_from_dict({"slurm_conf": str(tmp_path / "down.conf")}, path="down.yaml")
    with pytest.raises(ProfileError, match=r"down\.yaml: slurm_conf: .*down\.conf does not exist"):
        select_cluster(missing)


def test_tasks_per_node_override() -> None:
    two_node = load_profile(PROFILES / "local-2node.yaml")
    assert with_tasks_per_node(two_node, 2).tasks_per_node == 2
    assert with_tasks_per_node(two_node, None) is two_node
    with pytest.raises(ProfileError, match="at least one task"):
        with_tasks_per_node(two_node, 0)
    with pytest.raises(ProfileError, match="one task per GPU"):
        with_tasks_per_node(load_profile(PROFILES / "example-multinode-gpu.yaml"), 4)
