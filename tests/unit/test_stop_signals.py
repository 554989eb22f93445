"""StopSignals: SLURM's signals become flags the training loop polls; after training a late
time-limit warning is ignored (its default action would kill the finishing task)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from jobs.signals import StopRequest, StopSignals

NONE, SAVE_AND_EXIT, SAVE_AND_REQUEUE = (
    StopRequest.NONE,
    StopRequest.SAVE_AND_EXIT,
    StopRequest.SAVE_AND_REQUEUE,
)


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _deliver(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary


def test_term_then_usr2_ask_for_save_then_requeue(restore_handlers: None) -> None:
    signals = StopSignals()
    assert signals.code() == NONE
    assert isinstance(signals.code(), StopRequest) and int(signals.code()) == 0  # the loop compares ints
    _deliver(signal.SIGTERM)
    assert signals.code() == SAVE_AND_EXIT
    _deliver(signal.SIGUSR2)
    assert signals.code() == SAVE_AND_REQUEUE
    _deliver(signal.SIGTERM)  # a later SIGTERM does not downgrade a requeue
    assert signals.code() == SAVE_AND_REQUEUE


def test_late_usr2_is_ignored_after_training(restore_handlers: None) -> None:
    calls: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands in for submitit
    signals = StopSignals()
    signals.ignore_late_signals()
    # SIG_IGN, unlike a Python handler, is not reset to the killing default at interpreter exit
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    _deliver(signal.SIGUSR2)
    assert signals.code() == NONE and calls == []
