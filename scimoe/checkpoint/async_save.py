"""Asynchronous checkpoint writing (`checkpoint.async_save=true`): the step loop goes on while a background
thread encodes, writes and fsyncs this rank's files.

Tested by `python -m pytest tests/train/test_checkpoint.py tests/distributed/test_launch.py`. The tensors
are copied when the save is requested (a full copy of this rank's model and optimizer state in host
memory), so later steps cannot change what is written. The thread runs no collective (it would race
the training loop's own on the same process group): rank 0's thread instead waits for every rank's part
manifest to appear in the shared checkpoint folder before it renames the folder and writes the marker,
exactly as the synchronous protocol does after its barrier. One save is in flight per rank; the next
save, and the end of training, wait for it and re-raise its error. The thread is a daemon: a run that stops
on an error does not hang on a save whose other parts will never come (the half-written temporary folder is
never resumed).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable


class AsyncSaver:
    """Runs one save at a time in a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, work: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(work,), name="scimoe-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 (re-raised in wait)
            self._error = err

    def wait(self) -> None:
        """Block until the save in flight is complete; re-raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def poll(self) -> BaseException | None:
        """The error of a save that has finished and failed (taken: reported once), without waiting."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
        if self._thread is None and self._error is not None:
            err, self._error = self._error, None
            return err
        return None

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def wait_for_parts(folder: str, world: int, timeout_s: float = 3600.0, failed_too: bool = False,
                   besides: int | None = None) -> None:
    """Wait until all `world` ranks (but rank `besides`) have written their part manifest into `folder`; a rank
    that failed (its `.failed_rankR` file) ends the wait with an error or, with `failed_too`, counts as done."""
    deadline = time.monotonic() + timeout_s
    mine = (f".manifest_rank{besides:05d}.json", f".failed_rank{besides:05d}") if besides is not None else ()
    world -= besides is not None
    while True:
        names = [n for n in os.listdir(folder) if n not in mine]
        done = sum(n.startswith(".manifest_rank") for n in names)
        failed = sorted(n[len(".failed_"):] for n in names if n.startswith(".failed_rank"))
        if failed_too and done + len(failed) >= world:
            return
        if failed and not failed_too:
            raise OSError(f"{folder}: {', '.join(failed)} could not write their files")
        if done >= world:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: not every rank finished its checkpoint files within {timeout_s:.0f} s; "
                               "the checkpoint stays incomplete and is never resumed")
        time.sleep(0.05)
