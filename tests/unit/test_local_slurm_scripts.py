"""slurm/local/lib.sh: liveness by recorded PID (zombies count as dead) and stopping by PID.

Runs the shell helpers against throw-away processes in a temporary state directory, so the
real cluster is never touched.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "slurm" / "local" / "lib.sh"

pytestmark = pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/stat").exists(), reason="needs /proc"
)


def _bash(script: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IGFIQA_SLURM_STATE": str(state)}
    return subprocess.run(
        ["bash", "-c", f"source {LIB}; {script}"], capture_output=True, text=True, env=env, timeout=30
    )


def test_pid_alive_checks_existence_name_and_zombies(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert _bash(f"pid_alive {sleeper.pid} sleep", tmp_path).returncode == 0
        assert _bash(f"pid_alive {sleeper.pid} slurmd", tmp_path).returncode == 1  # a reused PID
        assert _bash("pid_alive notapid sleep", tmp_path).returncode == 1
        sleeper.kill()
        time.sleep(0.2)  # not reaped yet: a zombie, as stopped daemons are without systemd
        assert Path(f"/proc/{sleeper.pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        assert _bash(f"pid_alive {sleeper.pid} sleep", tmp_path).returncode == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _bash(f"pid_alive {sleeper.pid} sleep", tmp_path).returncode == 1


def test_stop_daemon_stops_by_recorded_pid(tmp_path: Path) -> None:
    # a stand-in daemon named "sleep", recorded as start.sh records the real ones
    run = tmp_path / "run"
    run.mkdir()
    target = subprocess.Popen(["sleep", "30"])
    bystander = subprocess.Popen(["sleep", "30"])  # same program, not recorded: must survive
    try:
        (run / "sleep.pid").write_text(f"{target.pid}\n")
        assert _bash("daemon_pid sleep", tmp_path).stdout.strip() == str(target.pid)
        result = _bash("stop_daemon sleep", tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"stopping sleep (pid {target.pid})" in result.stderr
        assert target.wait(timeout=5) is not None
        assert not (run / "sleep.pid").exists()
        assert bystander.poll() is None
        # stopping again is a no-op
        assert _bash("stop_daemon sleep", tmp_path).returncode == 0
    finally:
        for proc in (target, bystander):
            proc.kill()
            proc.wait()
