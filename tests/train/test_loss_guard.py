"""Loss guard: `python -m pytest tests/train/test_loss_guard.py`.

One step's logits are made NaN (a forward hook installed for that step only): the step is skipped and
counted, and it changes nothing (weights, AdamW moments and step count, routing bias, STE-EMA outputs):
the checkpoint after it equals the one before except for the data position, so the run goes on
exactly as a run that never saw that batch's update. Non-finite steps in a row beyond
`train.max_skipped_in_a_row` stop the run by name, keeping the last checkpoint.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from scimoe.checkpoint import contents, shards, storage
from scimoe.train import pretrain as pretrain_module
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config


def _poison(monkeypatch, steps: set[int]) -> None:
    """Make the logits NaN during the given (1-based) optimizer steps."""
    real = pretrain_module.train_step
    calls = {"n": 0}

    def train_step(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] not in steps:
            return real(model, *args, **kwargs)
        hook = model.lm_head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        try:
            return real(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(pretrain_module, "train_step", train_step)


def _tensors(path: str, kind: str) -> dict[str, torch.Tensor]:
    index = shards.ShardIndex(contents.files(path, kind))
    return {name: index.full(name) for name in index.names()}


def _config(steps: int):
    cfg = tiny_config(steps=steps)
    cfg.checkpoint.every = 1
    cfg.model.moe.router_mode = "ste_ema"
    cfg.model.moe.bias_update_rate = 1e-2
    return cfg


def test_a_nan_step_is_skipped_counted_and_changes_nothing(tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    records = pretrain(_config(steps=5), str(tmp_path)).records
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for i, r in enumerate(records) if i != 2)
    logged = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["skipped"] for r in logged] == [0, 0, 1, 0, 0]
    before, after, later = (storage.step_dir(str(tmp_path), s) for s in (2, 3, 4))
    for kind in ("model", "optimizer"):
        a, b = _tensors(before, kind), _tensors(after, kind)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)
        # ... while a normal step changes every kind of state the skipped one left alone.
        c = _tensors(later, kind)
        changed = {name for name in a if not torch.equal(a[name], c[name])}
        if kind == "model":
            assert any(n.endswith("selection_bias") for n in changed) and any(n.endswith("expert_output_ema") for n in changed)
            assert "layers.0.mlp.experts.down_proj" in changed
        else:
            assert "layers.0.mlp.experts.down_proj::exp_avg" in changed
    # The data position moved on: the skipped batch is not retried.
    assert torch.load(os.path.join(after, "train_state_rank00000.pt"), weights_only=False)["loader"] != \
        torch.load(os.path.join(before, "train_state_rank00000.pt"), weights_only=False)["loader"]


def test_too_many_skipped_steps_in_a_row_stop_the_run_by_name(tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 4, 5})
    cfg = _config(steps=6)
    cfg.train.max_skipped_in_a_row = 2
    with pytest.raises(RuntimeError, match=r"2 steps in a row .*train.max_skipped_in_a_row=2"):
        pretrain(cfg, str(tmp_path))
    assert storage.find_resume_path(str(tmp_path), "auto") == storage.step_dir(str(tmp_path), 3)
