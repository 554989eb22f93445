"""benchmarks/gpu_check.sh runs through here too (every part says why it measured nothing), so the
one script a lent GPU machine runs is not broken by a change nobody could try on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_completes_and_reports_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "PY": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"gpu_tests", "train_step", "nccl_objective"} <= set(summary)
    assert all(summary[name]["exit"] == 0 for name in ("gpu_tests", "train_step", "nccl_objective"))
    train = json.loads((tmp_path / "train_step.json").read_text())
    assert train["bench"] == "train_step" and "gpu" in train
    nccl = json.loads((tmp_path / "nccl_objective.txt").read_text().strip().splitlines()[-1])
    assert nccl["benchmark"] == "nccl_objective"
    assert (
        "skipped" in (tmp_path / "gpu_tests.txt").read_text()
        or "passed" in (tmp_path / "gpu_tests.txt").read_text()
    )
