"""GRPO under torchrun (data parallel): `python -m pytest tests/rl/test_grpo_launch.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.distributed


def test_two_data_parallel_ranks_share_the_prompts_and_log_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scimoe.train",
           "recipe=grpo", "train.steps=3", "hydra.run.dir=run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # 8 prompts × 8 samples per step over both ranks, one token each: the counts were summed over ranks
    assert all(r["samples"] == 64 and r["response_length"] == 1.0 for r in records)
    for r in records:  # 0/1 rewards summed over both ranks: a mean in 64ths whose std is that of a Bernoulli
        hits = r["reward_mean"] * 64
        assert abs(hits - round(hits)) < 1e-9, r["reward_mean"]
        assert abs(r["reward_std"] - (r["reward_mean"] * (1 - r["reward_mean"])) ** 0.5) < 1e-9, r
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "COMPLETE").exists()
    assert sorted(p for p in os.listdir(tmp_path / "run" / "checkpoints" / "step_00000003") if p.startswith("model")) \
        == ["model_rank00000.safetensors", "model_rank00001.safetensors"]


def test_expert_parallel_ranks_decode_in_step_with_a_kl_reference(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scimoe.train",
           "recipe=grpo", "train.steps=3", "parallel.ep=2", "grpo.kl_coef=0.05", "grpo.max_new_tokens=4",
           "hydra.run.dir=run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records] == [64, 64, 64]
    # the reference starts equal to the policy; every step updated it (balance terms at least)
    assert records[0]["kl"] == 0.0 and all(r["kl"] >= 0 and r["grad_norm"] > 0 for r in records)
    assert all(1 <= r["response_length"] <= 4 for r in records)  # ranks stopped together, at EOS or the limit
    assert records[-1]["routing_mismatch"] is not None
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").exists()
