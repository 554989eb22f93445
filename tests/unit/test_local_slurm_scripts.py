"""slurm/local/lib.sh: liveness by recorded PID (zombies count as dead) and stopping by PID.

Runs the shell helpers against throw-away processes in a temporary state directory, so the
real cluster is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
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


# --------------------------------------------------------------------------- twonode.sh helpers

TWO_NODE = LIB.parent / "twonode.sh"
HOSTS_BEGIN = "# >>> igfiqa local-2node: added by slurm/local/start.sh --nodes 2, removed by stop.sh"


def _two_node(script: str, state: Path, hosts: Path) -> subprocess.CompletedProcess[str]:
    """Run twonode.sh's helpers (sourced: nothing starts) on a stand-in hosts file."""
    (state / "2node").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "IGFIQA_SLURM_STATE": str(state), "IGFIQA_HOSTS_FILE": str(hosts)}
    return subprocess.run(
        ["bash", "-c", f"source {TWO_NODE}; {script}"], capture_output=True, text=True, env=env, timeout=30
    )


def test_hosts_entries_are_added_once_and_removed_leaving_every_other_line(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    original = "127.0.0.1 localhost\n127.0.1.1 vm.example vm\n::1 ip6-localhost ip6-loopback\n"
    hosts.write_text(original)
    for _ in range(2):  # idempotent
        result = _two_node("hosts_up && hosts_ok", tmp_path / "state", hosts)
        assert result.returncode == 0, result.stderr
    text = hosts.read_text()
    assert text.startswith(original)
    assert text[len(original) :].splitlines() == [
        HOSTS_BEGIN,
        "10.211.0.11 igfiqa-n1",
        "10.211.0.12 igfiqa-n2",
        "# <<< igfiqa local-2node",
    ]
    assert (tmp_path / "state" / "2node" / "hosts.backup").read_text() == original
    for _ in range(2):
        result = _two_node("hosts_down", tmp_path / "state", hosts)
        assert result.returncode == 0, result.stderr
    assert hosts.read_text() == original
    assert _two_node("hosts_ok", tmp_path / "state", hosts).returncode == 1


def test_a_block_edited_by_hand_is_replaced_not_duplicated(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        f"127.0.0.1 localhost\n{HOSTS_BEGIN}\n10.9.9.9 igfiqa-n1\n# <<< igfiqa local-2node\n10.0.0.5 db\n"
    )
    assert _two_node("hosts_up", tmp_path / "state", hosts).returncode == 0
    lines = hosts.read_text().splitlines()
    assert lines.count(HOSTS_BEGIN) == 1 and "10.9.9.9 igfiqa-n1" not in lines
    assert lines[:2] == ["127.0.0.1 localhost", "10.0.0.5 db"] and "10.211.0.12 igfiqa-n2" in lines


@pytest.mark.skipif(shutil.which("slurmd", path="/usr/sbin:/usr/bin") is None, reason="needs Debian's slurmd")
def test_two_node_configuration(tmp_path: Path) -> None:
    result = _two_node("render_conf", tmp_path / "state", tmp_path / "hosts")
    assert result.returncode == 0, result.stderr
    conf = result.stdout
    assert conf.startswith("# Rendered by slurm/local/start.sh --nodes 2")
    assert "ClusterName=igfiqa2n" in conf and "SlurmctldPort=6917" in conf
    assert re.search(r"^SlurmctldHost=\S+\(10\.211\.0\.1\)$", conf, re.MULTILINE)
    assert re.search(r"^NodeName=igfiqa-n1 NodeAddr=10\.211\.0\.11 CPUs=\d+ ", conf, re.MULTILINE)
    assert re.search(r"^NodeName=igfiqa-n2 NodeAddr=10\.211\.0\.12 CPUs=\d+ ", conf, re.MULTILINE)
    assert "PartitionName=multi Nodes=igfiqa-n1,igfiqa-n2 Default=YES" in conf and "LLN=YES" in conf
    assert "FirstJobId=100000" in conf  # no state yet: ids start above the one-node cluster's
    assert f"StateSaveLocation={tmp_path / 'state' / '2node'}/ctld" in conf
    settings = [line for line in conf.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "@" in line]  # every placeholder was filled in
