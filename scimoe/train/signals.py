"""Stop requests: SIGTERM / SIGUSR1 on any rank, or `train.max_minutes`, end the run cleanly.

Tested by `python -m pytest tests/distributed/test_preemption.py tests/train/test_session.py`. A signal only
sets a flag; at the next step boundary every rank learns whether any rank was asked to stop (one
all-reduce), and then all of them save a checkpoint and return, so the job exits 0 and `resume=auto`
continues it exactly. Slurm's `--signal=USR1@120` and a scheduler's SIGTERM both land here. `scimoe-train`
installs the handlers first thing (`StopRequest.install()`, before torch, megatron or the data load), so a
signal during start-up is caught too; this module imports nothing slow for that reason.

A rank blocked in C++ (a collective whose peer died) runs no Python handler, so the flag alone cannot stop it:
every caught signal is also written by the interpreter to a wake-up pipe that a watchdog thread reads, and
SIGTERM starts a grace period (`train.signal_grace_s`) after which a rank still running prints every thread's
stack and exits with code 143 — never a checkpoint from a rank in an unknown state.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("scimoe")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_UNHONOURED = 143
"""Exit code of a rank that could not honour SIGTERM within train.signal_grace_s (128 + SIGTERM)."""


class _Watchdog:
    """One per process: reads the signal numbers the interpreter writes to its wake-up pipe (even while the main
    thread is blocked in C++) and, after SIGTERM, ends the process if the installed StopRequest has not been
    closed within its grace period."""

    _started: "_Watchdog | None" = None

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._run, name="scimoe-signal-watchdog", daemon=True).start()

    @classmethod
    def start(cls) -> None:
        if cls._started is None:
            cls._started = cls()

    def _run(self) -> None:
        while True:
            received = os.read(self.read_fd, 64)
            request = StopRequest._installed
            if request is not None and signal.SIGTERM in received:
                threading.Thread(target=self._expire, args=(request, time.monotonic()), daemon=True).start()

    @staticmethod
    def _expire(request: "StopRequest", since: float) -> None:
        time.sleep(request.grace_s)
        if StopRequest._installed is not request:
            return  # honoured: the run ended (its handlers were put back)
        message = (f"scimoe: SIGTERM received {time.monotonic() - since:.0f} s ago was not honoured within "
                   f"train.signal_grace_s={request.grace_s:g} (blocked in a collective whose peer is gone, or a save "
                   f"too slow); exiting with code {EXIT_UNHONOURED} without a checkpoint. Where each thread was:\n")
        log.error(message.rstrip())
        sys.stderr.write(message)
        sys.stderr.flush()
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        os._exit(EXIT_UNHONOURED)


class StopRequest:
    """A flag set by signals or the time budget, agreed across ranks by `should_stop`."""

    _installed: "StopRequest | None" = None

    def __init__(self, max_minutes: float = 0.0, grace_s: float = 300.0) -> None:
        self.max_minutes, self.grace_s = max_minutes, grace_s
        self.started = time.monotonic()
        self.reason = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            _Watchdog.start()

    @classmethod
    def install(cls, max_minutes: float = 0.0, grace_s: float = 300.0) -> "StopRequest":
        """The process's stop request: the one installed at start-up (its clock started then), else a new one."""
        if cls._installed is None:
            cls._installed = cls(max_minutes, grace_s)
        cls._installed.max_minutes, cls._installed.grace_s = max_minutes, grace_s
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
