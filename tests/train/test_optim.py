"""Optimizer groups and the LR schedule: `python -m pytest tests/train/test_optim.py`."""
from __future__ import annotations

import math

import pytest

from scimoe.config import ModelConfig, TrainConfig
from scimoe.model import build_model
from scimoe.train.optim import lr_at, param_groups


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(steps=12, warmup_steps=2, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == 0.5 and lr_at(1, cfg) == 1.0
    assert lr_at(2, cfg) == pytest.approx(1.0)
    assert lr_at(7, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12, cfg) == pytest.approx(0.1)


def test_norms_and_fope_tables_get_no_weight_decay():
    model = build_model(ModelConfig(fope_trainable=True), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "rotary.cos_coef" in skipped and "norm.weight" in skipped
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
