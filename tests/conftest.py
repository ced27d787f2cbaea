"""Shared fixtures: run `python -m pytest tests` (or `make test`)."""
from __future__ import annotations

import os

import pytest
import torch

from scimoe.config import Config, LoggerConfig, ModelConfig, MoEConfig, TrainConfig

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**train) -> Config:
    """The tiny preset with a short run; override TrainConfig fields via keywords."""
    defaults = {"steps": 6, "global_batch": 4, "micro_batch": 2, "seq_len": 64, "warmup_steps": 2}
    defaults.update(train)
    return Config(model=ModelConfig(), train=TrainConfig(**defaults), logger=LoggerConfig(kind="jsonl"))


def small_moe(**kw) -> MoEConfig:
    base = {"num_experts": 8, "top_k": 4, "n_groups": 2, "ffn_hidden": 16, "aux_loss_coef": 0.0,
            "group_balance_coef": 0.0}
    base.update(kw)
    return MoEConfig(**base)
