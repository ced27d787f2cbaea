"""`scimoe-train` with test hooks, for the kill test: `python tests/distributed/slow_train.py OVERRIDES`
(also under torchrun). No library code changes: this wraps functions from the outside.

SCIMOE_TEST_SLOW_PATH=substring: a checkpoint file whose path contains it is announced by creating
`$SCIMOE_TEST_SENTINEL` and then written only after a long sleep, so the test can SIGKILL the job in
the middle of that save. SCIMOE_TEST_STEP_SECONDS=s: every optimizer step takes at least s seconds.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from scimoe.checkpoint import storage  # noqa: E402
from scimoe.train import pretrain  # noqa: E402
from scimoe.train.__main__ import main  # noqa: E402

slow_path = os.environ.get("SCIMOE_TEST_SLOW_PATH")
if slow_path:
    real_write = storage._fsync_write

    def _fsync_write(path: str, data: bytes) -> str:
        if slow_path in path:
            open(os.environ["SCIMOE_TEST_SENTINEL"], "w").close()
            time.sleep(600)
        return real_write(path, data)

    storage._fsync_write = _fsync_write

step_seconds = float(os.environ.get("SCIMOE_TEST_STEP_SECONDS", "0"))
if step_seconds:
    real_step = pretrain.train_step

    def train_step(*args, **kwargs):
        began = time.perf_counter()
        result = real_step(*args, **kwargs)
        time.sleep(max(0.0, step_seconds - (time.perf_counter() - began)))
        return result

    pretrain.train_step = train_step

if __name__ == "__main__":
    main()
