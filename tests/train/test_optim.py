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


def test_wsd_is_flat_then_decays_over_the_last_fraction_in_each_shape():
    cfg = TrainConfig(steps=20, warmup_steps=2, lr=1.0, min_lr=0.1, schedule="wsd", decay_fraction=0.25)
    assert [lr_at(s, cfg) for s in range(2)] == [0.5, 1.0]
    assert all(lr_at(s, cfg) == 1.0 for s in range(2, 15))  # stable until the last 5 of 20 steps
    for shape, remaining in (("linear", 1 - 0.6), ("cosine", 0.5 * (1 + math.cos(math.pi * 0.6))),
                             ("sqrt", 1 - math.sqrt(0.6))):
        cfg.decay_shape = shape
        assert lr_at(17, cfg) == pytest.approx(0.1 + 0.9 * remaining), shape  # 3 of the 5 decay steps done
        assert lr_at(19, cfg) == pytest.approx(0.1) and lr_at(30, cfg) == pytest.approx(0.1)


def test_constant_and_linear_schedules_and_a_length_apart_from_the_steps():
    constant = TrainConfig(steps=10, warmup_steps=2, lr=1.0, min_lr=0.1, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 1, 5, 50)] == [0.5, 1.0, 1.0, 1.0]
    linear = TrainConfig(steps=12, warmup_steps=2, lr=1.0, min_lr=0.1, schedule="linear")
    assert lr_at(7, linear) == pytest.approx(1.0 - 0.9 * 0.5) and lr_at(12, linear) == pytest.approx(0.1)
    longer = TrainConfig(steps=12, warmup_steps=2, lr=1.0, min_lr=0.1, decay_steps=22)
    assert lr_at(12, longer) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half of 22 steps
    assert lr_at(12, longer, length=12) == pytest.approx(0.1)


def test_a_run_continued_to_more_steps_keeps_its_schedule_unless_told(tmp_path, caplog):
    """Measured before: continuing `make train` from 50 to 55 steps re-stretched the cosine (1.01e-3 → 1.22e-3)."""
    from scimoe.train.pretrain import pretrain
    from tests.conftest import tiny_config

    run = str(tmp_path / "run")
    first = pretrain(tiny_config(steps=4), run).records
    with caplog.at_level("WARNING", logger="scimoe"):
        more = pretrain(tiny_config(steps=6), run).records
    cfg = tiny_config(steps=4)
    assert [r["lr"] for r in first] == [lr_at(s, cfg.train) for s in range(4)]
    assert [r["lr"] for r in more] == [cfg.train.min_lr] * 2  # the 4-step cosine had ended
    assert "learning-rate schedule this run was trained with is 4 steps long: it keeps that length" in caplog.text
    stretched = pretrain(tiny_config(steps=8, decay_steps=8), run).records  # asked for: a longer schedule
    assert [r["lr"] for r in stretched] == [lr_at(s, tiny_config(steps=8, decay_steps=8).train) for s in (6, 7)]
    assert "the learning-rate schedule changes from 4 to 8 steps at step 6" in caplog.text


def test_lr_restart_from_starts_a_new_schedule_from_a_finished_runs_state(tmp_path):
    from scimoe.checkpoint import storage
    from scimoe.train.pretrain import pretrain
    from tests.conftest import tiny_config

    finished = pretrain(tiny_config(steps=4), str(tmp_path / "a")).records
    cfg = tiny_config(steps=3, schedule="wsd", decay_fraction=0.5)
    cfg.train.lr_restart_from = storage.step_dir(str(tmp_path / "a"), 4)
    restarted = pretrain(cfg, str(tmp_path / "b")).records
    assert [r["step"] for r in restarted] == [1, 2, 3]
    assert [r["lr"] for r in restarted] == [lr_at(s, cfg.train) for s in range(3)]
    fresh = pretrain(tiny_config(steps=1), str(tmp_path / "c")).records
    # the same first batch: trained weights score it far better than the seeded start does
    assert restarted[0]["lm_loss"] < fresh[0]["lm_loss"] - 0.5 and finished[-1]["lm_loss"] < fresh[0]["lm_loss"]


def test_norms_and_fope_tables_get_no_weight_decay():
    model = build_model(ModelConfig(fope_trainable=True), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "rotary.cos_coef" in skipped and "norm.weight" in skipped
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
