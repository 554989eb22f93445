"""Fixtures for tests on the real local SLURM cluster (slurm/local/start.sh).

`slurm_cluster` starts the cluster once per session (a no-op taking ~0.2 s when it is up);
it skips only where starting is impossible here: not root, or the packages are missing and
apt-get is not available. Anything else that stops the cluster is a test failure with the
script's output. `submitit_folder` gives every job a fresh log folder, so a job id seen
before can never hand back an older job's result.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.cluster import ClusterProfile, load_profile

REPO = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO / "slurm" / "local" / "start.sh"
LOCAL_PROFILE = REPO / "slurm" / "clusters" / "local.yaml"


@dataclass(frozen=True)
class SlurmCluster:
    """The running local cluster and its profile."""

    profile: ClusterProfile
    start_script: Path
    start_output: str


def _start_cluster() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """Start (or find) the local single-node cluster with accounting."""
    result = _start_cluster()
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if os.geteuid() != 0:
            last_line = output.splitlines()[-1] if output else "(no output)"
            pytest.skip(f"the local SLURM cluster is not up and starting it needs root: {last_line}")
        if shutil.which("apt-get") is None and shutil.which("slurmctld", path="/usr/sbin:/usr/bin") is None:
            pytest.skip("the local SLURM cluster needs Debian's slurm packages and apt-get is not available")
        pytest.fail(f"slurm/local/start.sh failed (exit {result.returncode}):\n{output}", pytrace=False)
    return SlurmCluster(
        profile=load_profile(LOCAL_PROFILE), start_script=START_SCRIPT, start_output=result.stderr.strip()
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
