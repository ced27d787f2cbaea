"""SFT recipe: `python -m pytest tests/train/test_sft.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scimoe.config import Config, DataConfig, LoggerConfig, ModelConfig, RecipeConfig, TrainConfig, compose_config
from scimoe.train.pretrain import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sft_on_synthetic_chats_lowers_the_assistant_token_loss(tmp_path):
    cfg = Config(model=ModelConfig(), recipe=RecipeConfig(name="sft"),
                 data=DataConfig(source="sft", synthetic_rows=256),
                 train=TrainConfig(steps=40, global_batch=8, micro_batch=4, seq_len=128, lr=3e-3, warmup_steps=5),
                 logger=LoggerConfig(kind="jsonl"))
    records = pretrain(cfg, str(tmp_path)).records
    first, last = records[0]["lm_loss"], sum(r["lm_loss"] for r in records[-5:]) / 5
    # Measured: 5.95 → 1.78 (mean of the last 5 steps; assistant spans of arithmetic chats are regular).
    assert last < 0.5 * first, (first, last)
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "step_00000040"))


def test_recipe_sft_from_the_command_line_on_a_chat_file_reports_its_data(tmp_path):
    chats = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    chats.write_text("\n".join([json.dumps(good)] * 30 + ["{broken"]) + "\n")
    cmd = [sys.executable, "-m", "scimoe.train", "recipe=sft", f"data.path={chats}", "sft.max_bad_fraction=0.1",
           "train.steps=2", "train.seq_len=64", "train.global_batch=2", "train.micro_batch=2", "hydra.run.dir=run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert f"skipped {chats}:31" in log and "30 conversations" in log and "1 bad records" in log
    strict = subprocess.run(cmd[:-1] + ["sft.max_bad_fraction=0.01", "hydra.run.dir=run2"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and "more than sft.max_bad_fraction=0.01" in strict.stderr
    assert "Traceback" not in strict.stderr + strict.stdout  # one line, not a traceback


def test_sft_runs_data_parallel_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scimoe.train",
           "recipe=sft", "data.synthetic_rows=32", "train.steps=2", "train.seq_len=128", "train.global_batch=4",
           "train.micro_batch=2", "parallel.ep=2", "hydra.run.dir=run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    noise = ("Transformer Engine and Apex are not installed", "Megatron-FSDP")  # silenced in scimoe/__init__.py
    assert not [n for n in noise if n in out.stdout + out.stderr], (out.stdout + out.stderr)[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # one process with the same global batch and balance scope (micro-batch 2 × dp 2 = 4) logs the same losses
    single = pretrain(compose_config(["recipe=sft", "data.synthetic_rows=32", "train.steps=2", "train.seq_len=128",
                                      "train.global_batch=4", "train.micro_batch=4", "logger=none"]),
                      str(tmp_path / "single")).records
    for got, want in zip(records, single, strict=True):
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5), (records, single)
    assert single[1]["lm_loss"] != single[0]["lm_loss"]
