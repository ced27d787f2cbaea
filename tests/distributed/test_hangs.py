"""No process outlives its job: `python -m pytest tests/distributed/test_hangs.py`.

A rank whose peer died or hangs leaves its collective within parallel.collective_timeout_s; a rank blocked in a collective
leaves within train.signal_grace_s of a SIGTERM (exit 143, every thread's stack printed); the decode workers of a
`data=shards` run die with a trainer killed by SIGKILL. Ranks are started as plain processes (no torchrun to
clean up after them), as a lost node leaves them.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW_TRAIN = os.path.join(REPO, "tests", "distributed", "slow_train.py")
pytestmark = pytest.mark.distributed
ARGS = ["data=synthetic", "data.synthetic_rows=64", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=1",
        "train.steps=200", "logger=jsonl", "checkpoint.resume=never"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path, *extra: str) -> list[subprocess.Popen]:
    """Two ranks of one job, each a plain process (as srun or a lost torchrun leaves them)."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=REPO, SCIMOE_TEST_STEP_SECONDS="0.5")
        procs.append(subprocess.Popen([sys.executable, SLOW_TRAIN, *ARGS, *extra, f"hydra.run.dir={tmp_path / 'run'}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait_for_step(tmp_path, procs, step: int, timeout: float = 300) -> None:
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        for p in procs:
            assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline, "the job did not reach its step"
        time.sleep(0.2)


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        p.stdout.close()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_the_survivor_of_a_dead_or_hung_rank_exits_within_the_collective_timeout(tmp_path, fault):
    """SIGKILL: gloo sees the connection reset at once. SIGSTOP (a hung rank, or a node gone without a reset):
    only the timeout ends the wait (torch's default for gloo is 30 minutes)."""
    procs = _ranks(tmp_path, "parallel.collective_timeout_s=15")
    try:
        _wait_for_step(tmp_path, procs, 2)
        procs[1].send_signal(fault)
        began = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - began
        output = procs[0].stdout.read()
        assert code != 0 and waited < 60, (code, waited, output[-3000:])
        if fault == signal.SIGSTOP:
            assert waited > 10 and "timed out" in output.lower(), (waited, output[-3000:])
    finally:
        procs[1].send_signal(signal.SIGCONT)
        _end(procs)


def test_sigterm_to_a_rank_blocked_in_a_collective_exits_within_the_grace(tmp_path):
    procs = _ranks(tmp_path, "train.signal_grace_s=5", "parallel.collective_timeout_s=600")
    try:
        _wait_for_step(tmp_path, procs, 2)
        procs[1].send_signal(signal.SIGSTOP)  # alive but silent: rank 0 waits in its next collective
        time.sleep(3)
        procs[0].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = procs[0].wait(timeout=120)
        output = procs[0].stdout.read()
        assert code == 143 and time.monotonic() - sent < 60, (code, output[-3000:])
        assert "was not honoured within train.signal_grace_s=5" in output and "Thread 0x" in output
    finally:
        procs[1].send_signal(signal.SIGCONT)
        _end(procs)


def test_decode_workers_die_with_a_trainer_killed_by_sigkill(tmp_path):
    from scimoe.data.mm_preprocess import preprocess_multimodal
    from tests.data.mm_fixture import write_fixture

    fixture = write_fixture(str(tmp_path / "fixture"), repeats=2)
    preprocess_multimodal([fixture], str(tmp_path / "shards"), None, 384, shard_mb=0.01, progress=False)
    cmd = [sys.executable, SLOW_TRAIN, "model=tiny_mm", "data=shards", f"data.path={tmp_path / 'shards'}",
           "data.workers=2", "train.seq_len=256", "train.global_batch=2", "train.micro_batch=1", "train.steps=200",
           "logger=jsonl", f"hydra.run.dir={tmp_path / 'run'}"]
    trainer = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
                                             SCIMOE_TEST_STEP_SECONDS="0.5"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(tmp_path, [trainer], 1)
        children = psutil.Process(trainer.pid).children(recursive=True)
        assert len(children) >= 2  # the decode workers (and multiprocessing's resource tracker)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]
    finally:
        _end([trainer])
        for p in psutil.Process().children(recursive=True):
            if p.pid != os.getpid() and "resource_tracker" in " ".join(p.cmdline()):
                p.kill()
