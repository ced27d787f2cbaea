"""Checkpoint integrity (manifest, corruption fallback) and asynchronous saves:
`python -m pytest tests/train/test_checkpoint.py`."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from scimoe.checkpoint import contents, shards, storage
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config


@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    c = tiny_config(steps=4)
    c.checkpoint.every = 2
    pretrain(c, str(tmp_path))
    return str(tmp_path)


def test_manifest_lists_every_file_with_its_sha256(run_with_two_checkpoints):
    path = storage.step_dir(run_with_two_checkpoints, 4)
    with open(os.path.join(path, storage.MANIFEST)) as f:
        manifest = json.load(f)
    assert set(manifest) == {"model_rank00000.safetensors", "optimizer_rank00000.safetensors",
                            "train_state_rank00000.pt", "config.yaml", "tokenizer.json", "tokenizer_config.json"}
    assert all(len(digest) == 64 for digest in manifest.values())
    assert storage.verify(path) == []


def test_flipped_bytes_are_reported_and_auto_resume_falls_back(run_with_two_checkpoints, caplog):
    run = run_with_two_checkpoints
    shard = os.path.join(storage.step_dir(run, 4), "optimizer_rank00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.ERROR, logger="scimoe"):
        assert storage.find_resume_path(run, "auto") == storage.step_dir(run, 2)
    assert shard in caplog.text
    with pytest.raises(ValueError, match="optimizer_rank00000"):
        storage.find_resume_path(run, storage.step_dir(run, 4))
    # Training resumes from step 2 and reaches step 4 again, logging each step once.
    pretrain(tiny_config(steps=4), run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert storage.verify(storage.step_dir(run, 4)) == []


def test_async_save_writes_the_same_checkpoints_while_training_goes_on(tmp_path):
    runs = {}
    for mode in (False, True):
        c = tiny_config(steps=4)
        c.checkpoint.every, c.checkpoint.async_save, c.checkpoint.keep_last = 1, mode, 3
        runs[mode] = [r["loss"] for r in pretrain(c, str(tmp_path / str(mode))).records]
    assert runs[True] == runs[False]
    sync, background = (storage.complete_checkpoints(str(tmp_path / str(m))) for m in (False, True))
    assert [s for s, _ in background] == [s for s, _ in sync] == [2, 3, 4]  # keep_last pruned after completion
    for (_, a), (_, b) in zip(sync, background):
        assert storage.verify(b) == []
        for kind in ("model", "optimizer"):
            x, y = (shards.ShardIndex(contents.files(p, kind)) for p in (a, b))
            assert x.names() == y.names()
            for name in x.names():  # the copy taken at save time, not later steps' values
                assert torch.equal(x.full(name), y.full(name)), (b, name)


def test_a_failed_background_save_is_raised_not_lost(tmp_path, monkeypatch):
    from scimoe.checkpoint.async_save import AsyncSaver

    saver = AsyncSaver()
    saver.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        saver.wait()
    saver.wait()  # reported once


def test_a_checkpoint_from_before_the_released_fope_convention_is_refused_by_name(tmp_path):
    run = str(tmp_path)
    pretrain(tiny_config(steps=1), run)
    path = storage.step_dir(run, 1)
    marker = json.loads(open(os.path.join(path, "COMPLETE")).read())
    del marker["conventions"]  # what scimoe wrote before 2026-12-04
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        json.dump(marker, f)
    with pytest.raises(storage.CheckpointError, match="padded the sine of the clipped frequencies with 0"):
        pretrain(tiny_config(steps=2), run)
