"""How conversions run: one writer per --out, a full disk, Ctrl-C, resuming, progress rates and a
closed pipe. Interrupts and kills land at a named point (`IGFIQA_FAULT`, data_prep.sharded_output),
never at a moment chosen by a clock."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from data_prep.convert import convert, prepare_conversion, write_shard
from data_prep.errors import OutputLockedError
from data_prep.lock import Holder, OutputLock
from data_prep.sharded_output import FAULT_ENV
from data_prep.source import read_source
from data_prep.synth import synthesize
from jobs.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
IGFIQA = [sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """~720 images: a conversion takes a second or two, long enough to overlap or interrupt."""
    out = tmp_path_factory.mktemp("src") / "synth"
    synthesize(out, identities=60, images_per_identity=12, verification_pairs=2, seed=8)
    return out


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def igfiqa(*args: str, env_extra: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen(
        [*IGFIQA, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


# ----------------------------------------------------------------------------- item 5: the lock


def test_a_second_conversion_refuses_at_once_naming_the_holder(source, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    caplog.set_level("INFO")
    with OutputLock(out):
        code = cli_main(["prep", "convert", str(source), "--out", str(out), "--no-track"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "waiting for the lock" not in caplog.text  # refused without waiting
    assert err.startswith("igfiqa: error: ") and "being written by another conversion" in err
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in err and "--wait-lock" in err
    assert not (out / "shards").exists() and not (out / ".prep" / "plan.json").exists()


def test_two_conversions_at_once_one_wins_and_its_seed_is_what_is_written(source, tmp_path):
    out = tmp_path / "out"
    common = ["prep", "convert", str(source), "--out", str(out), "--samples-per-shard", "8", "--no-track"]
    runs = {seed: igfiqa(*common, "--seed", str(seed)) for seed in (1, 2)}
    results = {seed: (p.wait(timeout=240), p.stderr.read()) for seed, p in runs.items()}
    winners = [seed for seed, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser,) = set(runs) - set(winners)
    code, err = results[loser]
    assert code == 2 and "Traceback" not in err, err
    assert "being written by another conversion" in err or "another source or with other settings" in err, err
    assert json.loads((out / "dataset.json").read_text())["seed"] == winners[0]
    reference = tmp_path / "reference"
    convert(source, reference, samples_per_shard=8, seed=winners[0], progress=False)
    assert all_files(out) == all_files(reference)


def test_a_killed_holders_lock_is_taken_over(source, tmp_path, caplog):
    out = tmp_path / "out"
    code = (
        "import os, signal; from data_prep.lock import OutputLock; "
        f"OutputLock({str(out)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert killed.returncode == -signal.SIGKILL
    line = json.loads((out / ".prep" / "lock").read_text())
    assert line["host"] == socket.gethostname() and not Holder(**line).is_alive_here()
    caplog.set_level("WARNING")
    info = convert(source, out, samples_per_shard=100, progress=False)
    assert info.num_images > 0
    assert f"taking over the lock of {out} left by pid {line['pid']} on host" in caplog.text
    assert (out / ".prep" / "lock").read_text() == ""  # released cleanly


class _Announced(logging.Handler):
    """Sets `event` when a log line starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.event = prefix, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.event.set()


def test_wait_lock_waits_for_the_holder(source, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; from data_prep.lock import OutputLock; "
        f"lock = OutputLock({str(out)!r}); lock.acquire(); print('locked', flush=True); sys.stdin.readline()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"locked"
    with pytest.raises(OutputLockedError, match=r"it still runs after 0\.3 s"):
        convert(source, out, progress=False, wait_lock=0.3)
    assert holder.poll() is None  # it gave up while the holder still held the lock
    waiting = _Announced("waiting for the lock")
    lock_log = logging.getLogger("data_prep.lock")
    lock_log.addHandler(waiting)
    lock_log.setLevel(logging.INFO)
    result: dict[str, object] = {}
    run = threading.Thread(
        target=lambda: result.update(
            info=convert(source, out, samples_per_shard=100, progress=False, wait_lock=600)
        )
    )
    try:
        run.start()
        assert waiting.event.wait(timeout=120), "the second run did not wait for the lock"
        assert "info" not in result and holder.poll() is None
        holder.stdin.write(b"done\n")  # the holder lets go: the waiting run takes the lock and converts
        holder.stdin.flush()
        run.join(timeout=300)
    finally:
        lock_log.removeHandler(waiting)
        lock_log.setLevel(logging.NOTSET)
    assert holder.wait(timeout=30) == 0 and result["info"].num_images > 0


def test_holder_liveness_needs_the_same_process_not_only_the_same_pid():
    me = Holder(host=socket.gethostname(), pid=os.getpid(), started=0.0, command="x")
    assert me.is_alive_here()
    from data_prep.lock import _start_ticks

    reused = Holder(
        host=socket.gethostname(), pid=os.getpid(), started=0.0, command="x", start_ticks=_start_ticks(1)
    )
    assert not reused.is_alive_here()  # same pid, another process (pid reuse)
    assert not Holder(host="elsewhere", pid=os.getpid(), started=0.0, command="x").is_alive_here()


# ----------------------------------------------------------------------------- item 9: a full disk


def in_small_filesystem(mount: Path, size: str, code: str) -> subprocess.CompletedProcess:
    """Run python `code` with a `size` tmpfs mounted at `mount` (a private mount namespace, no root needed)."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs {mount} && exec {sys.executable} -c "$0"'
    return subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None or in_small_filesystem(probe, "64k", "pass").returncode != 0:
        pytest.skip("needs unprivileged user + mount namespaces (unshare -Urm) for a small tmpfs")


CLI = "import sys; from jobs.cli import main; sys.exit(main(sys.argv[1:]))"


def test_full_disk_while_planning_is_one_line(source, tmp_path, can_mount):
    mount = tmp_path / "small"
    code = f"import sys; sys.argv[1:] = ['prep', 'convert', {str(source)!r}, '--out', {str(mount / 'out')!r}, '--no-track']; {CLI}"
    result = in_small_filesystem(mount, "24k", code)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"igfiqa: error: {mount / 'out'}: no space left on the device while writing ")
    assert "are free" in last and "run the same command again" in last


def test_too_little_space_for_the_shards_is_refused_before_writing_them(source, tmp_path, can_mount):
    mount = tmp_path / "small"
    code = f"import sys; sys.argv[1:] = ['prep', 'convert', {str(source)!r}, '--out', {str(mount / 'out')!r}, '--no-track']; {CLI}"
    result = in_small_filesystem(mount, "1m", code)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(
        r"not enough free space: the shards need about [\d.]+ MB more, but only [\d.]+ kB are free", last
    ), last


def test_full_disk_while_writing_shards_names_the_folder_and_the_space(source, tmp_path, can_mount):
    """What a SLURM shard task meets: no pre-flight check, the disk fills during the writes."""
    mount = tmp_path / "small"
    out = mount / "out"
    code = (
        "from data_prep.convert import prepare_conversion, write_shard; from data_prep.errors import DataError\n"
        f"plan = prepare_conversion({str(source)!r}, {str(out)!r}, samples_per_shard=50)\n"
        "try:\n"
        "    for i in range(plan.num_shards): write_shard(plan.out, i)\n"
        "except DataError as exc: print('DataError:', exc)\n"
    )
    result = in_small_filesystem(mount, "1m", code)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    message = result.stdout.strip()
    assert message.startswith(
        f"DataError: {out}: no space left on the device while writing {out}/shards/shard-"
    )
    assert re.search(r"needs about [\d.]+ MB more there, [\d.]+ kB are free", message), message


# ----------------------------------------------------------------------------- item 16


@pytest.mark.timeout(300)
def test_ctrl_c_says_how_to_resume_and_the_resumed_run_says_what_was_done(source, tmp_path, caplog):
    """Ctrl-C (SIGINT to the whole process group) as soon as shard 3 is written, by a worker process."""
    out = tmp_path / "out"
    run = igfiqa(
        "prep",
        "convert",
        str(source),
        "--out",
        str(out),
        "--samples-per-shard",
        "8",
        "--workers",
        "2",
        "--no-track",
        env_extra={FAULT_ENV: "after-shard:3:INT"},
        start_new_session=True,  # its own process group, which the interrupt goes to
    )
    code, err = run.wait(timeout=240), run.stderr.read()
    assert code == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err, err
    assert not (out / "dataset.json").exists()
    done = len(list((out / ".prep").glob("shard-*.json")))
    plan = json.loads((out / ".prep" / "plan.json").read_text())
    assert (out / ".prep" / "shard-00003.json").is_file() and done < plan["num_shards"]
    caplog.set_level("INFO")
    convert(source, out, samples_per_shard=8, workers=1, progress=True)
    assert f"resuming: {done} of {plan['num_shards']} shards already written" in caplog.text
    reference = tmp_path / "reference"
    convert(source, reference, samples_per_shard=8, progress=False)
    assert all_files(out) == all_files(reference)


def test_validation_progress_shows_no_impossible_rate(source, capsys):
    read_source(source, progress=True)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in lines if line.startswith("validate records") and "100%" in line][-1]
    rate = re.search(r"([\d.]+)([kM]?)rec/s", final)
    if rate:  # records checked at once are not counted in the rate
        value = float(rate.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[rate.group(2)]
        assert value < 1e5, final


def test_inspect_into_a_closed_pipe_is_quiet(source, tmp_path):
    convert(source, tmp_path / "out", samples_per_shard=8, progress=False)
    run = igfiqa("prep", "inspect", str(tmp_path / "out"), "--json")
    run.stdout.close()  # `| head` that has already stopped reading
    code, err = run.wait(timeout=120), run.stderr.read()
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert code == 0


def test_counts_of_one_are_singular(source, tmp_path, capsys):
    assert (
        cli_main(
            [
                "prep",
                "convert",
                str(source),
                "--out",
                str(tmp_path / "out"),
                "--samples-per-shard",
                "5000",
                "--no-track",
            ]
        )
        == 0
    )
    assert "classes into 1 shard: " in capsys.readouterr().out
    assert cli_main(["prep", "inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert ", 1 shard\n" in text and "1 shard, images per shard" in text


def test_the_stages_a_slurm_array_runs_need_no_lock(source, tmp_path):
    """The submitting process holds the lock while the array's tasks write shards and it finalises."""
    from data_prep.convert import finalize_conversion

    out = tmp_path / "out"
    with OutputLock(out):
        plan = prepare_conversion(source, out, samples_per_shard=400)
        for i in range(plan.num_shards):
            write_shard(out, i)
        assert finalize_conversion(out).num_images == plan.num_images
