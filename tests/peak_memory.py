"""Peak resident memory of one call: `peak_rss_during(fn)` samples this process's RSS every millisecond in a
thread while `fn` runs and returns (fn's result, peak RSS − RSS before the call, in bytes). Used by the
time-series memory test and benchmarks/data_pipeline.py (torch's CPU allocator keeps no statistics)."""
from __future__ import annotations

import threading
import time

import psutil


def peak_rss_during(fn):
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return result, peak[0] - before
