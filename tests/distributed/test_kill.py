"""SIGKILL at any moment never leaves a checkpoint that `resume=auto` would load half-written.

Run: `python -m pytest tests/distributed/test_kill.py`. A real two-rank torchrun job (its whole process
group, as a lost node would) is killed: while rank 1 writes its model file of step 4; after step 6's
folder is renamed into place but before its COMPLETE marker; and between saves. Each time `resume=auto`
picks the last complete checkpoint, and the final run reaches step 8 with the uninterrupted run's
losses, each step logged once. Saves are slowed by tests/distributed/slow_train.py, not library code.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from scimoe.checkpoint import contents, storage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW_TRAIN = os.path.join(REPO, "tests", "distributed", "slow_train.py")
pytestmark = pytest.mark.distributed
ARGS = ["data=synthetic", "data.synthetic_rows=64", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=1",
        "train.steps=8", "checkpoint.every=2", "parallel.ep=2", "logger=jsonl"]


def _start(run_dir, *extra: str, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SLOW_TRAIN, *ARGS,
           *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(condition, job: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if job.poll() is not None:
            raise AssertionError(f"job ended before {what}: {job.stdout.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _kill(job: subprocess.Popen) -> None:
    """SIGKILL torchrun and both ranks at once, no cleanup anywhere. torchrun starts each rank in a session of
    its own, so the ranks are found as its descendants, not through its process group."""
    tree = psutil.Process(job.pid).children(recursive=True)
    os.killpg(job.pid, signal.SIGKILL)
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    job.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)
    job.stdout.close()


def _logged(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_sigkill_during_saves_and_between_them_always_resumes_from_a_complete_checkpoint(tmp_path):
    run, sentinel = tmp_path / "killed", tmp_path / "saving"
    # 1. In the middle of writing step 4's files (rank 1's model shard).
    job = _start(run, SCIMOE_TEST_SLOW_PATH=".step_00000004.tmp/model_rank00001", SCIMOE_TEST_SENTINEL=str(sentinel))
    _wait_for(sentinel.exists, job, "the save of step 4")
    _kill(job)
    assert (run / "checkpoints" / ".step_00000004.tmp").exists()  # the half-written save is there ...
    assert storage.find_resume_path(str(run), "auto") == storage.step_dir(str(run), 2)  # ... and ignored
    sentinel.unlink()
    # 2. After step 6's folder is renamed into place, before its COMPLETE marker.
    job = _start(run, SCIMOE_TEST_SLOW_PATH="step_00000006/.COMPLETE.tmp", SCIMOE_TEST_SENTINEL=str(sentinel))
    _wait_for(sentinel.exists, job, "the marker of step 6")
    _kill(job)
    assert os.path.isdir(storage.step_dir(str(run), 6)) and not storage.is_complete(storage.step_dir(str(run), 6))
    assert storage.find_resume_path(str(run), "auto") == storage.step_dir(str(run), 4)
    # 3. Between saves: after step 5 is logged, while step 6 runs.
    job = _start(run, SCIMOE_TEST_STEP_SECONDS="2")
    _wait_for(lambda: max((r["step"] for r in _logged(run)), default=0) >= 5, job, "step 5")
    _kill(job)
    assert storage.find_resume_path(str(run), "auto") == storage.step_dir(str(run), 4)
    # 4. Finish, and compare with a run never interrupted.
    for run_dir in (run, tmp_path / "whole"):
        job = _start(run_dir)
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-4000:]
    killed, whole = _logged(run), _logged(tmp_path / "whole")
    assert [r["step"] for r in killed] == list(range(1, 9))  # each step once
    assert [r["loss"] for r in killed] == [r["loss"] for r in whole]  # bit-identical
    assert [s for s, _ in storage.complete_checkpoints(str(run))] == [2, 4, 6, 8]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]  # leftovers cleaned up


def test_random_kills_of_a_two_rank_job_always_resume_bit_identically(tmp_path):
    """Four SIGKILLs at random moments (fixed seed: start-up, steps, saves and markers alike), then the run
    finishes: every step logged once, losses bit-identical to a run never interrupted."""
    rng = random.Random(2026)
    args = ["train.steps=16", "checkpoint.every=1"]
    run = tmp_path / "killed"
    for _ in range(4):
        job = _start(run, *args, SCIMOE_TEST_STEP_SECONDS="0.2")
        time.sleep(rng.uniform(2.0, 9.0))
        if job.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        _kill(job)
        resumable = storage.find_resume_path(str(run), "auto")
        assert resumable is None or storage.problem(resumable) is None
    for run_dir in (run, tmp_path / "whole"):
        job = _start(run_dir, *args)
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-4000:]
    killed, whole = _logged(run), _logged(tmp_path / "whole")
    assert [r["step"] for r in killed] == list(range(1, 17))
    assert [r["loss"] for r in killed] == [r["loss"] for r in whole]
