"""When training saves and when it stops: every N steps, every M minutes, and on a signal.

The loop calls `PeriodicCheckpointer.step(global_step)` once per step (as dinov2's
loop calls `periodic_checkpointer.step(iteration)`). The decision is the same on
every rank: one tiny all-reduce MAX of (stop request, time due) per step, over a
CPU (gloo) group so that polling never synchronises a GPU stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

import torch
import torch.distributed as dist


class StopRequest(IntEnum):
    """What the job asks of the training loop (set by signal handlers, polled each step)."""

    NONE = 0
    SAVE_AND_EXIT = 1  # SIGTERM/SIGINT: save, then let SLURM decide
    SAVE_AND_REQUEUE = 2  # SIGUSR2: save, then requeue


class PeriodicCheckpointer:
    """Calls `save(reason)` on every rank together when a save is due; reports stop requests."""

    def __init__(
        self,
        save: Callable[[str], None],
        *,
        every_steps: int,
        every_minutes: float,
        stop_requested: Callable[[], int],
        is_main: bool,
        world_size: int,
        group: dist.ProcessGroup | None = None,
        last_saved_step: int = -1,
    ) -> None:
        self._save = save
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.stop_requested = stop_requested
        self.is_main = is_main
        self.world_size = world_size
        self.group = group
        self.last_saved_step = last_saved_step
        self._last_save_time = time.monotonic()

    def save(self, global_step: int, reason: str) -> None:
        """Save now (collective)."""
        self._save(reason)
        self.last_saved_step = global_step
        self._last_save_time = time.monotonic()

    def step(self, global_step: int) -> StopRequest:
        """After optimizer step `global_step`: save if due; on a stop request save and return it.

        A step saved already (e.g. the best checkpoint of a validation) is not saved again.
        """
        stop, time_due = self._poll()
        fresh = self.last_saved_step != global_step
        if stop:
            if fresh:
                self.save(global_step, "signal")
            return stop
        if fresh and (time_due or (self.every_steps and global_step % self.every_steps == 0)):
            self.save(global_step, "periodic")
        return StopRequest.NONE

    def finish(self, global_step: int) -> None:
        """The final save, unless this step is saved already."""
        if self.last_saved_step != global_step:
            self.save(global_step, "final")

    def _poll(self) -> tuple[StopRequest, bool]:
        """(stop request, time-based save due): rank 0's clock, any rank's signal, one all-reduce."""
        since = time.monotonic() - self._last_save_time
        due = bool(self.is_main and self.every_minutes > 0 and since >= self.every_minutes * 60.0)
        flags = torch.tensor([int(self.stop_requested()), int(due)], dtype=torch.int64)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return StopRequest(int(flags[0])), bool(flags[1])
