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
from typing import Any

import yaml

from pipeline.config import ConfigError

EXECUTORS = ("slurm", "local", "debug")
GPU_REQUESTS = ("gpus-per-node", "gres")
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


class ProfileError(ConfigError):
    """A cluster profile is missing, malformed, or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class ClusterProfile:
    """Where and how jobs run; see slurm/clusters/example-multinode-gpu.yaml for every key."""

    name: str
    executor: str = "slurm"  # slurm | local (subprocesses here) | debug (in this process)
    slurm_conf: str | None = None  # SLURM_CONF of the cluster; None: the machine's default cluster
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1  # = gpus_per_node on a GPU profile: one task per GPU
    gpus_per_node: int = 0
    gpu_request: str = "gpus-per-node"  # how GPUs are asked for: --gpus-per-node=N or --gres=gpu:N
    cpus_per_task: int = 1
    mem_gb: float | None = None  # None: no --mem; 0: all of each node's memory
    time_min: int = 60
    signal_delay_s: int = 90  # USR2 this many seconds before the time limit: checkpoint and requeue
    max_requeues: int = 3  # requeues after a timeout (submitit's slurm_max_num_timeout)
    collective_timeout_s: int = 1800  # rendezvous and every collective: a lost or hung peer fails after this
    array_parallelism: int = 256  # array tasks running at once
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    setup: tuple[str, ...] = ()  # shell lines run before the tasks start (module load, conda activate)
    env: dict[str, str] = field(default_factory=dict)  # exported before the tasks start
    additional_parameters: dict[str, str | int | bool] = field(default_factory=dict)  # other sbatch flags
    srun_args: tuple[str, ...] = ()
    source: str = ""  # the file it came from (for messages)

    @property
    def world_size(self) -> int:
        """Processes of a job on `nodes` nodes."""
        return self.nodes * self.tasks_per_node


_KEYS = [f.name for f in dataclasses.fields(ClusterProfile) if f.name != "source"]


def _fail(path: Path | str, key: str, message: str) -> ProfileError:
    return ProfileError(f"cluster profile {path}: {key}: {message}")


def _int(raw: dict[str, Any], key: str, default: int, minimum: int, path: Path) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, key, f"expected an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise _fail(path, key, f"must be >= {minimum}, got {value}")
    return value


def _optional_str(raw: dict[str, Any], key: str, path: Path) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, key, f"expected a non-empty string or null, got {value!r}")
    return value


def _choice(raw: dict[str, Any], key: str, default: str, allowed: tuple[str, ...], path: Path) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise _fail(path, key, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _string_list(raw: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, key, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _scalar_map(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping, got {type(value).__name__} {value!r}")
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, dict | list) or v is None:
            raise _fail(path, f"{key}.{k}", f"expected a string, number or boolean, got {v!r}")
    return dict(value)


def profile_from_dict(raw: dict[str, Any], *, path: Path | str = "<dict>") -> ClusterProfile:
    """Build and check a profile from a mapping (what `load_profile` reads from YAML)."""
    path = Path(path)
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (known: {', '.join(_KEYS)})")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise _fail(path, "name", f"expected a non-empty string, got {name!r}")

    gpus = _int(raw, "gpus_per_node", 0, 0, path)
    if gpus > 0:
        tasks = _int(raw, "tasks_per_node", gpus, 1, path)
        if tasks != gpus:
            raise _fail(
                path,
                "tasks_per_node",
                f"{tasks} differs from gpus_per_node {gpus}: jobs run one task per GPU",
            )
    else:
        tasks = _int(raw, "tasks_per_node", 1, 1, path)

    mem_gb = raw.get("mem_gb")
    if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(mem_gb, int | float) or mem_gb < 0):
        raise _fail(path, "mem_gb", f"expected a number >= 0 or null, got {mem_gb!r}")

    time_min = _int(raw, "time_min", 60, 1, path)
    signal_delay_s = _int(raw, "signal_delay_s", 90, 0, path)
    if signal_delay_s >= time_min * 60:
        raise _fail(
            path, "signal_delay_s", f"{signal_delay_s} s is not shorter than time_min ({time_min} min)"
        )

    slurm_conf = _optional_str(raw, "slurm_conf", path)
    if slurm_conf is not None and not Path(slurm_conf).is_absolute():
        raise _fail(path, "slurm_conf", f"expected an absolute path, got {slurm_conf!r}")

    exclusive = raw.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise _fail(path, "exclusive", f"expected true/false, got {exclusive!r}")

    env = _scalar_map(raw, "env", path)
    for var, value in env.items():
        if not _ENV_NAME.match(var):
            raise _fail(path, f"env.{var}", "not a valid environment variable name")
        env[var] = str(value).lower() if isinstance(value, bool) else str(value)

    additional = _scalar_map(raw, "additional_parameters", path)
    for flag in additional:
        owner = _RESERVED_SBATCH.get(flag.replace("-", "_"))
        if owner is not None:
            raise _fail(
                path, f"additional_parameters.{flag}", f"set by the profile's {owner}; use that instead"
            )

    return ClusterProfile(
        name=name,
        executor=_choice(raw, "executor", "slurm", EXECUTORS, path),
        slurm_conf=slurm_conf,
        partition=_optional_str(raw, "partition", path),
        nodes=_int(raw, "nodes", 1, 1, path),
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        gpu_request=_choice(raw, "gpu_request", "gpus-per-node", GPU_REQUESTS, path),
        cpus_per_task=_int(raw, "cpus_per_task", 1, 1, path),
        mem_gb=None if mem_gb is None else float(mem_gb),
        time_min=time_min,
        signal_delay_s=signal_delay_s,
        max_requeues=_int(raw, "max_requeues", 3, 0, path),
        collective_timeout_s=_int(raw, "collective_timeout_s", 1800, 1, path),
        array_parallelism=_int(raw, "array_parallelism", 256, 1, path),
        account=_optional_str(raw, "account", path),
        qos=_optional_str(raw, "qos", path),
        constraint=_optional_str(raw, "constraint", path),
        exclusive=exclusive,
        setup=_string_list(raw, "setup", path),
        env=env,
        additional_parameters=additional,
        srun_args=_string_list(raw, "srun_args", path),
        source=str(path),
    )


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and check a cluster profile YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"cluster profile {path} does not exist (profiles live in slurm/clusters/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"cluster profile {path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProfileError(f"cluster profile {path}: the top level must be a mapping of keys")
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
