"""`torchrun -m scimoe.train` on CPU with gloo: one run folder, one metrics.jsonl, resumable.

Run: `python -m pytest tests/distributed/test_launch.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.distributed


def torchrun(nproc: int, cwd, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scimoe.train", "data=synthetic", "data.synthetic_rows=32", "train.seq_len=32",
           "train.global_batch=4", "train.micro_batch=1", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_expert_parallel_launch_writes_one_run_and_resumes(tmp_path):
    first = torchrun(2, tmp_path, "parallel.ep=2", "train.steps=3", "checkpoint.every=1", "checkpoint.async_save=true")
    assert first.returncode == 0, first.stderr[-4000:]
    runs = os.listdir(tmp_path / "outputs")
    assert len(runs) == 1, runs  # both ranks agreed on the default run folder
    run = tmp_path / "outputs" / runs[0]
    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").exists()  # written in the background, complete when the job exits
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000001", "step_00000002", "step_00000003"]
    assert sorted(p for p in os.listdir(ckpt) if p.startswith("model")) == [
        "model_rank00000.safetensors", "model_rank00001.safetensors"]
    output = first.stderr + first.stdout
    assert "TP1-PP1-EP2-DP2 rank 0" in output
    grid = [line.split() for line in output.splitlines() if line.strip().startswith(("0  ", "1  "))][-2:]
    # rank, tp, pp, cp, dp, ep, expert-dp
    assert [row[:7] for row in grid] == [["0", "0", "0", "0", "0", "0", "0"], ["1", "0", "0", "0", "1", "1", "0"]]
    again = torchrun(2, tmp_path, "parallel.ep=2", "train.steps=5", f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # one writer, resumed from step 3
    for r in records:  # expert loads summed over both ranks: every token of the global batch, top_k times
        assert all(sum(layer) == r["tokens"] * 4 for layer in r["moe"]["tokens_per_expert"]), r["moe"]
        assert r["tokens"] == 4 * 32 and 0 < r["mfu"] < 1


def test_a_two_rank_checkpoint_resumes_in_one_process_from_the_command_line(tmp_path):
    first = torchrun(2, tmp_path, "parallel.ep=2", "train.steps=1", "hydra.run.dir=run")
    assert first.returncode == 0, first.stderr[-4000:]
    single = subprocess.run([sys.executable, "-m", "scimoe.train", "data=synthetic", "data.synthetic_rows=32",
                             "train.seq_len=32", "train.global_batch=4", "train.micro_batch=2", "train.steps=2",
                             "hydra.run.dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert single.returncode == 0, single.stderr[-4000:]
    assert "saved by 2 ranks, this run has 1" in single.stdout + single.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
