"""Checkpoint integrity: manifest, corruption fallback: `python -m pytest tests/train/test_checkpoint.py`."""
from __future__ import annotations

import json
import logging
import os

import pytest

from scimoe.train import checkpoint
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config


@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    c = tiny_config(steps=4)
    c.checkpoint.every = 2
    pretrain(c, str(tmp_path))
    return str(tmp_path)


def test_manifest_lists_every_file_with_its_sha256(run_with_two_checkpoints):
    path = checkpoint.step_dir(run_with_two_checkpoints, 4)
    with open(os.path.join(path, checkpoint.MANIFEST)) as f:
        manifest = json.load(f)
    assert set(manifest) == {"model_rank00000.safetensors", "optimizer_rank00000.safetensors",
                            "train_state_rank00000.pt", "config.yaml"}
    assert all(len(digest) == 64 for digest in manifest.values())
    assert checkpoint.verify(path) == []


def test_flipped_bytes_are_reported_and_auto_resume_falls_back(run_with_two_checkpoints, caplog):
    run = run_with_two_checkpoints
    shard = os.path.join(checkpoint.step_dir(run, 4), "optimizer_rank00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.ERROR, logger="scimoe"):
        assert checkpoint.find_resume_path(run, "auto") == checkpoint.step_dir(run, 2)
    assert shard in caplog.text
    with pytest.raises(ValueError, match="optimizer_rank00000"):
        checkpoint.find_resume_path(run, checkpoint.step_dir(run, 4))
    # Training resumes from step 2 and reaches step 4 again, logging each step once.
    pretrain(tiny_config(steps=4), run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert checkpoint.verify(checkpoint.step_dir(run, 4)) == []
