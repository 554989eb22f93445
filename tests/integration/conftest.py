"""Fixtures for tests on the real local SLURM cluster (slurm/local/start.sh).

`slurm_cluster` starts the cluster once per session (a no-op taking ~0.2 s when it is up);
it skips only where starting is impossible here: not root, or the packages are missing and
apt-get is not available. Anything else that stops the cluster is a test failure with the
script's output. `two_node_cluster` does the same for the two-node cluster
(`start.sh --nodes 2`), and also skips where network namespaces are not available (a
container without CAP_SYS_ADMIN). `submitit_folder` gives every job a fresh log folder, so a
job id seen before can never hand back an older job's result.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jobs.cluster import ClusterProfile, load_profile

REPO = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO / "slurm" / "local" / "start.sh"
LOCAL_PROFILE = REPO / "slurm" / "clusters" / "local.yaml"
TWO_NODE_PROFILE = REPO / "slurm" / "clusters" / "local-2node.yaml"
# Where start.sh says why it cannot run here at all (rather than failing to do what it should).
_CANNOT_RUN_HERE = ("not available here", "apt-get is not available")


@dataclass(frozen=True)
class SlurmCluster:
    """The running local cluster and its profile."""

    profile: ClusterProfile
    start_script: Path
    start_output: str


def _start_cluster(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    return subprocess.run(
        ["bash", str(START_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env=environment,
    )


def _started_or_skip(result: subprocess.CompletedProcess[str], what: str) -> None:
    """Skip where the cluster cannot start here at all; fail with the script's output otherwise."""
    if result.returncode == 0:
        return
    output = (result.stdout + result.stderr).strip()
    last_line = output.splitlines()[-1] if output else "(no output)"
    if os.geteuid() != 0:
        pytest.skip(f"{what} is not up and starting it needs root: {last_line}")
    if shutil.which("apt-get") is None and shutil.which("slurmctld", path="/usr/sbin:/usr/bin") is None:
        pytest.skip(f"{what} needs Debian's slurm packages and apt-get is not available")
    if any(reason in last_line for reason in _CANNOT_RUN_HERE):
        pytest.skip(f"{what} cannot run here: {last_line}")
    pytest.fail(f"slurm/local/start.sh failed (exit {result.returncode}):\n{output}", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """Start (or find) the local single-node cluster with accounting."""
    result = _start_cluster()
    _started_or_skip(result, "the local SLURM cluster")
    return SlurmCluster(
        profile=load_profile(LOCAL_PROFILE), start_script=START_SCRIPT, start_output=result.stderr.strip()
    )


def start_two_node_cluster() -> subprocess.CompletedProcess[str]:
    """`start.sh --nodes 2`: the one-node cluster, then the two-node one (idempotent)."""
    return _start_cluster("--nodes", "2")


@pytest.fixture(scope="session")
def two_node_cluster() -> SlurmCluster:
    """Start (or find) the two-node cluster (slurm/local/twonode.sh) beside the one-node one."""
    result = start_two_node_cluster()
    _started_or_skip(result, "the local two-node SLURM cluster")
    return SlurmCluster(
        profile=load_profile(TWO_NODE_PROFILE), start_script=START_SCRIPT, start_output=result.stderr.strip()
    )


@pytest.fixture
def submitit_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Path]:
    """A factory of fresh submitit folders, one per job.

    Jobs unpickle functions defined in test modules: PYTHONPATH (which sbatch passes on to the
    job) gets the repository root so `tests.…` imports on the node.
    """
    python_path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{python_path}" if python_path else str(REPO))
    counter = itertools.count()

    def new_folder() -> Path:
        folder = tmp_path / f"submitit-{next(counter)}"
        folder.mkdir()
        return folder

    return new_folder


# --------------------------------------------------------------------------- measurements

_MEASUREMENTS = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def measurements(request: pytest.FixtureRequest) -> list[str]:
    """Lines of figures a test measured (timings, steps lost); printed at the end of the session."""
    return request.config.stash.setdefault(_MEASUREMENTS, [])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print what the tests measured (see `measurements`)."""
    lines = config.stash.get(_MEASUREMENTS, [])
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)
