"""Stop requests: SIGTERM / SIGUSR1 on any rank, or `train.max_minutes`, end the run cleanly.

Tested by `python -m pytest tests/distributed/test_preemption.py tests/train/test_session.py`. A signal only
sets a flag; at the next step boundary every rank learns whether any rank was asked to stop (one
all-reduce), and then all of them save a checkpoint and return, so the job exits 0 and `resume=auto`
continues it exactly. Slurm's `--signal=USR1@120` and a scheduler's SIGTERM both land here. `scimoe-train`
installs the handlers first thing (`StopRequest.install()`, before torch, megatron or the data load), so a
signal during start-up is caught too; this module imports nothing slow for that reason.
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

    _installed: "StopRequest | None" = None

    def __init__(self, max_minutes: float = 0.0) -> None:
        self.max_minutes = max_minutes
        self.started = time.monotonic()
        self.reason = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    @classmethod
    def install(cls, max_minutes: float = 0.0) -> "StopRequest":
        """The process's stop request: the one installed at start-up (its clock started then), else a new one."""
        if cls._installed is None:
            cls._installed = cls(max_minutes)
        cls._installed.max_minutes = max_minutes
        return cls._installed

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def signalled(self, any_rank) -> bool:
        """True on every rank if any rank got a signal (the time budget not counted)."""
        return any_rank(bool(self.reason))

    def should_stop(self, any_rank) -> bool:
        """True on every rank if any rank got a signal or ran out of time; `any_rank(bool) -> bool`."""
        if not self.reason and self.max_minutes and time.monotonic() - self.started > 60 * self.max_minutes:
            self.reason = f"train.max_minutes={self.max_minutes} reached"
        return any_rank(bool(self.reason))

    def close(self) -> None:
        """Put the previous handlers back (a later run in the same process installs its own)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if StopRequest._installed is self:
            StopRequest._installed = None
