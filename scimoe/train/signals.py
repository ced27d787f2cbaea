"""Stop requests: SIGTERM / SIGUSR1 on any rank, or `train.max_minutes`, end the run cleanly.

Tested by `python -m pytest tests/distributed/test_preemption.py`. A signal only sets a flag; at the
next step boundary every rank learns whether any rank was asked to stop (one all-reduce), and then
all of them save a checkpoint and return, so the job exits 0 and `resume=auto` continues it exactly.
Slurm's `--signal=USR1@120` and a scheduler's SIGTERM both land here.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger("scimoe")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag set by signals or the time budget, agreed across ranks by `should_stop`."""

    def __init__(self, max_minutes: float = 0.0) -> None:
        self.max_minutes = max_minutes
        self.started = time.monotonic()
        self.reason = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def should_stop(self, any_rank) -> bool:
        """True on every rank if any rank got a signal or ran out of time; `any_rank(bool) -> bool`."""
        if not self.reason and self.max_minutes and time.monotonic() - self.started > 60 * self.max_minutes:
            self.reason = f"train.max_minutes={self.max_minutes} reached"
        return any_rank(bool(self.reason))

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
