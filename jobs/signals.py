"""Turn SLURM's signals into a clean save-at-a-step-boundary, then requeue or exit.

submitit answers SIGUSR2 (preemption, or `--signal=USR2@N` before the time limit) by
calling `checkpoint()` and requeueing **on global rank 0, inside the signal
handler**, i.e. in the middle of a training step and while the other ranks keep
running: no collective save of the sharded classifier is possible there. So the job
replaces the handlers with flag setters, the training loop polls the flag once per
step (all-reduced, so every rank stops at the same step), saves a checkpoint
together, and only then does rank 0 hand over to submitit's own handler, which
calls `TrainJob.checkpoint()` and requeues.

SIGTERM (`scontrol requeue`, `scancel`, and the first signal of a preemption) also
saves, then waits to be killed: SLURM decides what happens next.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pipeline.training.checkpointer import StopRequest  # what the loop polls; larger wins

log = logging.getLogger(__name__)


class StopSignals:
    """Flag-setting handlers for SIGTERM/SIGINT (save, exit) and SIGUSR2 (save, requeue)."""

    def __init__(self, *, requeue_signal: int = signal.SIGUSR2, catch_interrupt: bool = False):
        self._request = StopRequest.NONE
        self._requeue_signal = requeue_signal
        self._original_requeue_handler: Any = signal.getsignal(requeue_signal)
        signal.signal(signal.SIGTERM, self._on_term)
        if catch_interrupt:
            signal.signal(signal.SIGINT, self._on_term)
        signal.signal(requeue_signal, self._on_requeue)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)
        self._request = max(self._request, StopRequest.SAVE_AND_EXIT)

    def _on_requeue(self, signum: int, frame: FrameType | None) -> None:
        log.warning(
            "received %s: saving a checkpoint at the end of this step, then requeueing",
            signal.Signals(signum).name,
        )
        self._request = StopRequest.SAVE_AND_REQUEUE

    def code(self) -> StopRequest:
        """The pending request, polled by the training loop once per step (an int to the loop)."""
        return self._request

    def requeue_via_submitit(self) -> None:
        """Run submitit's original SIGUSR2 handler: on rank 0 it calls checkpoint() and requeues."""
        handler = self._original_requeue_handler
        if callable(handler):
            handler(self._requeue_signal, None)
        else:
            log.warning("no submitit handler for %s: nothing requeues this job", self._requeue_signal)

    def ignore_late_signals(self) -> None:
        """Training has ended: ignore a time-limit warning (SIGUSR2) that arrives from now on.

        At interpreter exit CPython resets Python-level handlers to SIG_DFL, and SIGUSR2's default
        action kills the process, turning a completed task into FAILED; SIG_IGN survives the exit.
        """
        signal.signal(self._requeue_signal, signal.SIG_IGN)

    def wait_for_slurm(
        self, *, is_main: bool, limit_s: float = 600.0, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        """After a SIGTERM save: wait to be killed; requeue if a SIGUSR2 (preemption) follows."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self._request == StopRequest.SAVE_AND_REQUEUE and is_main:
                self.requeue_via_submitit()
                return
            sleep(0.2)
