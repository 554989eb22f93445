"""Cluster profiles (`slurm/clusters/*.yaml`) and the submitit executor built from one.

A profile says where and how jobs run: partition, nodes, tasks and GPUs per node, CPUs,
memory, time, the requeue signal, account/qos/constraint, shell setup lines, environment
variables (NCCL settings, ...) and extra sbatch flags. `load_profile` checks every key and
value and names the file and key in its errors; `executor_parameters` is the ONE place
that turns a profile into submitit parameters; `make_executor` applies them.

One task per GPU: on a GPU profile `tasks_per_node` equals `gpus_per_node` (it may be left
out); on a CPU profile (`gpus_per_node: 0`) `tasks_per_node` is the number of processes.

A profile with `slurm_conf` names a cluster other than the machine's default one (the local
two-node cluster, or one of several clusters a site reaches through `SLURM_CONF`):
`select_cluster` points this process's SLURM commands at it (submitit's sbatch/sacct/scancel and
ours), and the job inherits it. One process talks to one cluster at a time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config_loader import NOT_A_KEY, ConfigError, from_mapping, load_yaml_mapping
from pipeline.parallel.env import DEFAULT_COLLECTIVE_TIMEOUT_S

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# sbatch flags the profile's own keys (or submitit) set: additional_parameters must not override them.
_RESERVED_SBATCH = {
    "job_name": "the job name",
    "partition": "partition",
    "nodes": "nodes",
    "ntasks_per_node": "tasks_per_node",
    "gpus_per_node": "gpus_per_node",
    "gres": "gpus_per_node with gpu_request: gres",
    "cpus_per_task": "cpus_per_task",
    "mem": "mem_gb",
    "time": "time_min",
    "signal": "signal_delay_s",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclusive": "exclusive",
    "array": "the array submission",
    "output": "submitit's log files",
    "error": "submitit's log files",
    "open_mode": "submitit's log files",
}
Scalar = str | int | float | bool  # a value of env or additional_parameters


class ProfileError(ConfigError):
    """A cluster profile is missing, malformed, or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class ClusterProfile:
    """Where and how jobs run; see slurm/clusters/example-multinode-gpu.yaml for every key.

    Each field is a profile key with its default; `load_profile` reads them through the typed
    loader (`pipeline.config_loader`), then `check_profile` adds the ranges and the rules
    between keys.
    """

    name: str  # default: the profile's file name
    executor: Literal["slurm", "local", "debug"] = "slurm"  # local: subprocesses here; debug: this process
    slurm_conf: str | None = None  # SLURM_CONF of the cluster; None: the machine's default cluster
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1  # on a GPU profile: gpus_per_node, one task per GPU
    gpus_per_node: int = 0
    # how GPUs are asked for: --gpus-per-node=N or --gres=gpu:N
    gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    cpus_per_task: int = 1
    mem_gb: float | None = None  # None: no --mem; 0: all of each node's memory
    time_min: int = 60
    signal_delay_s: int = 90  # USR2 this many seconds before the time limit: checkpoint and requeue
    max_requeues: int = 3  # requeues after a timeout (submitit's slurm_max_num_timeout)
    # rendezvous and every collective: a lost or hung peer fails after this
    collective_timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S
    array_parallelism: int = 256  # array tasks running at once
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    setup: tuple[str, ...] = ()  # shell lines run before the tasks start (module load, conda activate)
    env: dict[str, Scalar] = field(default_factory=dict)  # exported before the tasks start (as strings)
    additional_parameters: dict[str, Scalar] = field(default_factory=dict)  # other sbatch flags
    srun_args: tuple[str, ...] = ()
    source: str = field(default="", metadata=NOT_A_KEY)  # the file it came from (for messages)

    @property
    def world_size(self) -> int:
        """Processes of a job on `nodes` nodes."""
        return self.nodes * self.tasks_per_node


# the smallest value of each number
_MINIMUM = {
    "nodes": 1,
    "tasks_per_node": 1,
    "gpus_per_node": 0,
    "cpus_per_task": 1,
    "mem_gb": 0,
    "time_min": 1,
    "signal_delay_s": 0,
    "max_requeues": 0,
    "collective_timeout_s": 1,
    "array_parallelism": 1,
}


def check_profile(profile: ClusterProfile) -> None:
    """ConfigError "KEY: what is wrong" for a value out of range or keys that disagree."""
    for key, minimum in _MINIMUM.items():
        value = getattr(profile, key)
        if value is not None and value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {value}")
    if not profile.name.strip():
        raise ConfigError(f"name: expected a non-empty string, got {profile.name!r}")
    for key in ("slurm_conf", "partition", "account", "qos", "constraint"):
        value = getattr(profile, key)
        if value is not None and not value.strip():
            raise ConfigError(f"{key}: expected a non-empty string or null, got {value!r}")
    if profile.gpus_per_node > 0 and profile.tasks_per_node != profile.gpus_per_node:
        raise ConfigError(
            f"tasks_per_node: {profile.tasks_per_node} differs from gpus_per_node {profile.gpus_per_node}: "
            "jobs run one task per GPU"
        )
    if profile.signal_delay_s >= profile.time_min * 60:
        raise ConfigError(
            f"signal_delay_s: {profile.signal_delay_s} s is not shorter than time_min ({profile.time_min} min)"
        )
    if profile.slurm_conf is not None and not Path(profile.slurm_conf).is_absolute():
        raise ConfigError(f"slurm_conf: expected an absolute path, got {profile.slurm_conf!r}")
    for var in profile.env:
        if not _ENV_NAME.match(var):
            raise ConfigError(f"env.{var}: not a valid environment variable name")
    for flag in profile.additional_parameters:
        owner = _RESERVED_SBATCH.get(flag.replace("-", "_"))
        if owner is not None:
            raise ConfigError(f"additional_parameters.{flag}: set by the profile's {owner}; use that instead")


def profile_from_dict(raw: dict[str, Any], *, path: Path | str = "<dict>") -> ClusterProfile:
    """Build and check a profile from a mapping (what `load_profile` reads from YAML).

    Two defaults follow from other values: `name` is the file's name, and on a GPU profile
    `tasks_per_node` is `gpus_per_node`.
    """
    path = Path(path)
    try:
        profile = from_mapping(ClusterProfile, {"name": path.stem, **raw})
        if "tasks_per_node" not in raw and profile.gpus_per_node > 0:
            profile = dataclasses.replace(profile, tasks_per_node=profile.gpus_per_node)
        check_profile(profile)
    except ConfigError as exc:
        raise ProfileError(f"cluster profile {path}: {exc}") from None
    env = {
        var: str(value).lower() if isinstance(value, bool) else str(value)
        for var, value in profile.env.items()
    }
    return dataclasses.replace(profile, env=env, source=str(path))


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and check a cluster profile YAML file (through the bounded loader)."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"cluster profile {path} does not exist (profiles live in slurm/clusters/)")
    try:
        raw = load_yaml_mapping(path, what="cluster profile")
    except ConfigError as exc:
        raise ProfileError(f"cluster profile {exc}") from None
    return profile_from_dict(raw, path=path)


def executor_parameters(
    profile: ClusterProfile,
    *,
    job_name: str,
    nodes: int | None = None,
    timeout_min: int | None = None,
    array_parallelism: int | None = None,
    array_task: bool = False,
    task_gpus: int = 0,
    task_cpus: int = 1,
) -> dict[str, Any]:
    """The profile as `AutoExecutor.update_parameters` keywords (the one profile → submitit mapping).

    `array_task=True` is for single-process work such as one shard of a conversion: one node,
    one task, `task_cpus` CPUs, `task_gpus` GPUs (default: one CPU, no GPU), no memory request,
    never exclusive; the rest of the profile (partition, account, time, setup, env, ...) still applies.
    """
    if array_task:
        profile = dataclasses.replace(
            profile,
            nodes=1,
            tasks_per_node=1,
            gpus_per_node=task_gpus,
            cpus_per_task=task_cpus,
            mem_gb=None,
            exclusive=False,
        )
        nodes = 1
    nodes = profile.nodes if nodes is None else nodes
    if nodes < 1:
        raise ProfileError(f"cluster profile {profile.source}: nodes: must be >= 1, got {nodes}")
    if profile.executor != "slurm" and nodes > 1:
        raise ProfileError(
            f"cluster profile {profile.source}: executor {profile.executor} runs on one node only"
        )
    timeout_min = profile.time_min if timeout_min is None else timeout_min
    if profile.signal_delay_s >= timeout_min * 60:
        raise ProfileError(
            f"cluster profile {profile.source}: signal_delay_s {profile.signal_delay_s} s "
            f"is not shorter than the time limit ({timeout_min} min)"
        )
    # Environment variables become setup lines, so they reach every task on every node; they come
    # after the profile's own setup lines (module load, ...) so the profile has the last word.
    env = dict(profile.env)
    if profile.slurm_conf:  # srun and scontrol inside the job talk to the same cluster
        env["SLURM_CONF"] = profile.slurm_conf
    setup = list(profile.setup) + [f"export {var}={shlex.quote(value)}" for var, value in env.items()]
    params: dict[str, Any] = {
        "name": job_name,
        "nodes": nodes,
        "tasks_per_node": profile.tasks_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "timeout_min": timeout_min,
        "local_setup": setup,
        "slurm_setup": setup,
        "slurm_signal_delay_s": profile.signal_delay_s,
        "slurm_array_parallelism": array_parallelism or profile.array_parallelism,
    }
    if profile.mem_gb is not None:
        params["mem_gb"] = profile.mem_gb
    if profile.gpus_per_node:
        if profile.gpu_request == "gres":
            params["slurm_gres"] = f"gpu:{profile.gpus_per_node}"
            params["local_gpus_per_node"] = profile.gpus_per_node
        else:
            params["gpus_per_node"] = profile.gpus_per_node
    optional = {
        "slurm_partition": profile.partition,
        "slurm_account": profile.account,
        "slurm_qos": profile.qos,
        "slurm_constraint": profile.constraint,
        "slurm_exclusive": True if profile.exclusive else None,
        "slurm_additional_parameters": dict(profile.additional_parameters) or None,
        "slurm_srun_args": list(profile.srun_args) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


_DEFAULT_SLURM_CONF = os.environ.get("SLURM_CONF")  # what this process was started with


def select_cluster(profile: ClusterProfile) -> None:
    """Point this process's SLURM commands at the profile's cluster (sets or restores SLURM_CONF).

    submitit runs sbatch, sacct and scancel as subprocesses of this process, whenever a job's
    state is asked, so the choice is process-wide: a profile with `slurm_conf` selects that
    cluster; one without selects the cluster this process started with. A missing file is a
    ProfileError naming what starts that cluster.
    """
    if profile.executor != "slurm":
        return
    if profile.slurm_conf is None:
        if _DEFAULT_SLURM_CONF is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = _DEFAULT_SLURM_CONF
        return
    if not Path(profile.slurm_conf).is_file():
        raise ProfileError(
            f"cluster profile {profile.source}: slurm_conf: {profile.slurm_conf} does not exist "
            "(is that cluster up? the local two-node one starts with `make slurm-up NODES=2`)"
        )
    os.environ["SLURM_CONF"] = profile.slurm_conf


def make_executor(
    profile: ClusterProfile,
    folder: str | Path,
    *,
    nodes: int | None = None,
    job_name: str,
    timeout_min: int | None = None,
    array_parallelism: int | None = None,
    array_task: bool = False,
    task_gpus: int = 0,
    task_cpus: int = 1,
) -> Any:
    """A `submitit.AutoExecutor` writing its scripts and logs under `folder` (`%j` = job id).

    `array_task`, `task_gpus`, `task_cpus`: see `executor_parameters`. Selects the profile's cluster
    (`select_cluster`).

    Use a fresh folder per submission: a folder reused across clusters whose job ids restart
    would hand back an older job's result file.
    """
    import submitit

    select_cluster(profile)
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=profile.executor,
        slurm_max_num_timeout=profile.max_requeues,
        local_max_num_timeout=profile.max_requeues,
    )
    executor.update_parameters(
        **executor_parameters(
            profile,
            job_name=job_name,
            nodes=nodes,
            timeout_min=timeout_min,
            array_parallelism=array_parallelism,
            array_task=array_task,
            task_gpus=task_gpus,
            task_cpus=task_cpus,
        )
    )
    return executor
