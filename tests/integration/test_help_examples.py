"""Every example in `igfiqa … --help` runs as written (from the repository root, in the order the
top-level help gives), and every `igfiqa` line in the README parses.

Examples that need real data sets, a GPU cluster or a job id of the reader's own (/data/…,
the protocol configs, the multi-node profile, job 1234, the several-minute demo, matcher
builds and studies) are parsed by the real argument parser only; the rest run for real against the
embedded data.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.cli import build_parser
from tests.train_fixtures import new_mlflow_store

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    [],
    ["prep"],
    ["prep", "synth"],
    ["prep", "convert"],
    ["prep", "bins"],
    ["prep", "inspect"],
    ["train"],
    ["submit"],
    ["eval"],
    ["erc"],
    ["score"],
    ["export"],
    ["calibrate"],
    ["data", "preview"],
    ["curate"],
    ["curate", "score"],
    ["curate", "filter"],
    ["matchers"],
    ["matchers", "build"],
    ["matchers", "list"],
    ["study"],
    ["study", "run"],
    ["study", "status"],
    ["study", "report"],
    ["demo"],
    ["jobs"],
]
EXAMPLE = re.compile(r"^\s+(igfiqa .+?)\s*(#.*)?$")
PARSE_ONLY = (
    "/data/",
    "protocol_",
    "example-multinode",
    "local-2node",
    "1234",
    "igfiqa demo",
    "igfiqa matchers build",
    "igfiqa study run",
    "igfiqa study report",
)


def _help(command: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *command, "--help"], capture_output=True, text=True, check=True
    )
    return out.stdout


def examples() -> list[str]:
    """Every example line of every --help, top-level first, without trailing comments."""
    found: list[str] = []
    for command in COMMANDS:
        for line in _help(command).splitlines():
            match = EXAMPLE.match(line)
            if match and match.group(1) not in found:
                found.append(match.group(1))
    return found


def _parses(line: str) -> None:
    args = shlex.split(line)[1:]
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"does not parse: {line}") from exc


def _real_data_stand_ins(cwd: Path) -> None:
    """What the examples of real data name, made from the synthetic set (the same formats)."""
    synth = cwd / "work" / "synth"
    webface = cwd / "data" / "faces_webface_112x112"
    ms1m = cwd / "data" / "ms1m"
    for folder in (webface, ms1m):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("train.rec", "train.idx", "property"):
            shutil.copy(synth / name, folder / name)
    shutil.copy(synth / "clean.bin", ms1m / "lfw.bin")
    shutil.copy(synth / "mixed.bin", ms1m / "cfp_fp.bin")
    from tests.eval_fixtures import face_image

    (cwd / "photos").mkdir(exist_ok=True)
    for i in range(3):
        face_image(i).save(cwd / "photos" / f"face{i}.png")
    face_image(9).save(cwd / "extra.jpg")


def test_every_help_example_parses() -> None:
    """What CI checks of the examples (running them all is `long`): each parses as written."""
    lines = examples()
    assert len(lines) >= 15
    for line in lines:
        _parses(line)


@pytest.mark.long  # ~5 min on 2 cores: `make test` runs it, .ci/run parses the examples only
@pytest.mark.timeout(2400)
def test_every_help_example_runs_as_written(
    slurm_cluster, mlflow_store_template: Path, tmp_path: Path
) -> None:
    lines = examples()
    typical = [m.group(1) for line in _help([]).splitlines() if (m := EXAMPLE.match(line))]
    assert len(typical) >= 5 and lines[: len(typical)] == typical
    for name in ("configs", "slurm"):
        (tmp_path / name).symlink_to(REPO / name)
    new_mlflow_store(mlflow_store_template, tmp_path)  # the examples' default store: ./mlflow.db
    ran = []
    for line in lines:
        _parses(line)
        if any(marker in line for marker in PARSE_ONLY):
            continue
        if line.startswith("igfiqa prep convert data/") and not (tmp_path / "data").exists():
            _real_data_stand_ins(tmp_path)
        if "photos/" in line and not (tmp_path / "photos").exists():
            _real_data_stand_ins(tmp_path)
        command = f"{sys.executable} -m jobs.cli {line.removeprefix('igfiqa ')}"
        started = time.monotonic()
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        ran.append(line)
        print(f"{time.monotonic() - started:6.1f} s  {line}", flush=True)
    assert len(ran) >= 15, ran


def test_every_readme_command_parses() -> None:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
    lines = [
        line.split("  #")[0].strip()
        for block in blocks
        for line in block.replace("\\\n", " ").splitlines()
        if line.strip().startswith("igfiqa ")
    ]
    assert len(lines) >= 10
    for line in lines:
        _parses(re.sub(r"\s+", " ", line))
