"""`model=tiny_mm` pretraining on real series (statsmodels) and synthetic images: the loss falls
(measured: 5.95 → 0.30 over 30 steps; the captions are short and regular).
Run: `python -m pytest tests/train/test_multimodal_train.py`."""
from __future__ import annotations

import json
import os

from scimoe.launch.slurm import compose_config
from scimoe.train.pretrain import pretrain
from tests.data.mm_fixture import write_fixture


def test_tiny_mm_trains_end_to_end_and_the_loss_falls(tmp_path):
    path = write_fixture(str(tmp_path / "data"), repeats=4, bad=True)
    cfg = compose_config(["model=tiny_mm", "data=multimodal", f"data.path={path}", "data.max_bad_fraction=0.2",
                          "train.seq_len=256", "train.global_batch=4", "train.micro_batch=2", "train.steps=30",
                          "train.lr=3e-3", "train.warmup_steps=3", "logger=jsonl"])
    records = pretrain(cfg, str(tmp_path / "run")).records
    first, last = records[0]["lm_loss"], sum(r["lm_loss"] for r in records[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    logged = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
    seen = {k: sum(r["tokens_by_modality"][k] for r in logged) for k in ("text", "image", "time_series")}
    assert seen["image"] > 0 and seen["time_series"] > 0 and seen["text"] > 0
