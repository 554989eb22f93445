"""One writer per output folder: the lock `prep convert` holds on its `--out`.

The lock is `OUT/.prep/lock`, held with `flock` for as long as the conversion runs, and
holding one JSON line naming the holder (host, pid, start time, command). A second run
refuses at once with that holder in its message, or, asked to wait (`--wait-lock`),
waits until the lock is free.

Stale locks: the kernel drops a `flock` when its holder dies, however it dies, so a
killed run never blocks the next one; the next run sees the dead holder's line (a clean
release empties the file) and says that it takes the lock over. On a filesystem without
working `flock` (some FUSE or `nolock` NFS mounts) the line decides alone: a holder on
this host whose pid is still that process (same boot, same start time) holds the lock,
any other line is stale and is taken over. The file is never deleted while in use (only
a run that created OUT and then failed before planning removes it with the folder), so
two runs can never each lock a different file of the same name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.errors import DataError, OutputLockedError

log = logging.getLogger(__name__)

LOCK_DIR = ".prep"
LOCK_FILE = "lock"
POLL_SECONDS = 0.5
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell a live holder from a dead one on its own host."""

    host: str
    pid: int
    started: float  # time.time() when it took the lock
    command: str
    boot_id: str = ""  # of the holder's host (Linux), so a pid from before a reboot is not "alive"
    start_ticks: int = -1  # the holder process's start time (Linux /proc), so a reused pid is not "alive"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} (since {when}: {self.command})"

    def is_alive_here(self) -> bool:
        """True when this holder is a running process of this host (False when unknown elsewhere)."""
        if self.host != socket.gethostname() or (self.boot_id and self.boot_id != _boot_id()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, owned by someone else
        return self.start_ticks < 0 or _start_ticks(self.pid) == self.start_ticks


_REPLACED = Holder(host="", pid=-1, started=0.0, command="(the lock file was replaced)")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    """Start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), -1 if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _me() -> Holder:
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=time.time(),
        command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python",
        boot_id=_boot_id(),
        start_ticks=_start_ticks(os.getpid()),
    )


def _read_holder(fd: int) -> Holder | None:
    """The holder line of an open lock file; None when empty (released) or unreadable."""
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        fields: dict[str, Any] = json.loads(raw)
        return Holder(**fields)
    except (ValueError, TypeError):
        return Holder(host="?", pid=-1, started=0.0, command=f"unreadable lock line {raw[:60]!r}")


class OutputLock:
    """`with OutputLock(out, wait=0):` holds OUT's lock, else raises OutputLockedError naming the holder.

    `wait`: seconds to wait for a held lock (0: refuse at once; math.inf: as long as it takes).
    """

    def __init__(self, folder: Path, *, wait: float = 0.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_DIR / LOCK_FILE
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (see the class docstring)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError("output path exists and is not a folder", path=self.folder)
        deadline = time.monotonic() + self.wait if math.isfinite(self.wait) else math.inf
        announced = False
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = self._try(fd)
            if holder is None:
                self._fd = fd
                return
            os.close(fd)
            if holder is _REPLACED:  # the file we locked was deleted meanwhile: lock the new one
                continue
            if time.monotonic() >= deadline:
                hint = "wait for it to finish" if self.wait == 0 else f"it still runs after {self.wait:g} s"
                raise OutputLockedError(
                    f"is being written by another conversion: {holder.describe()}; {hint} (or pass "
                    f"--wait-lock to wait for it), or choose another --out (lock file {self.path})",
                    path=self.folder,
                )
            if not announced:
                log.info("waiting for the lock of %s, held by %s", self.folder, holder.describe())
                announced = True
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def _try(self, fd: int) -> Holder | None:
        """None when `fd` now holds the lock (our line written), else who holds it."""
        flock_works = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or Holder(host="?", pid=-1, started=time.time(), command="starting")
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            flock_works = False
            log.warning(
                "%s: this filesystem does not support flock; relying on the lock file's line", self.path
            )
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            return _REPLACED
        previous = _read_holder(fd)
        if (
            previous is not None
            and previous.pid != os.getpid()
            and previous.is_alive_here()
            and not flock_works
        ):
            return previous
        if previous is not None:
            log.warning(
                "taking over the lock of %s left by %s, which no longer holds it (killed?)",
                self.folder,
                previous.describe(),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(_me())) + "\n").encode(), 0)
        os.fsync(fd)
        return None

    def release(self, *, remove: bool = False) -> None:
        """Let the lock go (the file is emptied: a clean release); `remove` deletes the file too."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
