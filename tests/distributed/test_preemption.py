"""SIGTERM on one rank of a real torchrun job: every rank saves, the job exits 0, and the resumed run
continues the loss curve exactly. Run: `python -m pytest tests/distributed/test_preemption.py`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.distributed
ARGS = ["data=synthetic", "data.synthetic_rows=64", "train.seq_len=32", "train.global_batch=4",
        "train.micro_batch=1", "train.steps=400", "parallel.ep=2", "logger=jsonl"]


def _cmd(run_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "scimoe.train", *ARGS, f"hydra.run.dir={run_dir}", *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=REPO)


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_sigterm_on_one_rank_saves_exits_zero_and_resumes_exactly(tmp_path):
    run = tmp_path / "preempted"
    job = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "scimoe.train" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGTERM)  # one rank only, as a scheduler or Slurm's --signal might
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-4000:]
    assert "stop requested (SIGTERM)" in output or "stop requested (another rank)" in output
    from scimoe.checkpoint import contents, storage

    saved = storage.complete_checkpoints(str(run))
    assert saved, output[-2000:]
    stopped_at = saved[-1][0]
    assert max(_losses(run)) == stopped_at < 400
    resumed = subprocess.run(_cmd(run, "train.exit_after_steps=3"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    whole = subprocess.run(_cmd(tmp_path / "whole", f"train.exit_after_steps={stopped_at + 3}"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert _losses(run) == _losses(tmp_path / "whole")  # every step, bit-identical, no step twice
