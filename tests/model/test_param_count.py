"""The Intern-S1-Pro preset's size: `python -m pytest tests/model/test_param_count.py`."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from scimoe.config import register_configs, validate
from scimoe.run_dir import register_resolvers
from scimoe.model import build_model
from scimoe.model.counting import parameter_counts


def _preset(name: str):
    register_configs()
    register_resolvers()
    with initialize_config_module(config_module="scimoe.configs", version_base=None):
        return validate(compose(config_name="config", overrides=[f"model={name}"])).model


def _category(name: str) -> str:
    if "experts" in name:
        return "experts"
    if "router" in name:
        return "routers"
    if name.startswith(("embed_tokens", "lm_head")):
        return "embedding"
    if "rotary" in name:
        return "fope"
    if "norm" in name and "self_attn" not in name:
        return "norms"
    return "attention"


def test_intern_s1_pro_matches_the_hand_count_on_meta():
    cfg = _preset("intern_s1_pro")
    with torch.device("meta"):
        model = build_model(cfg)
    built: dict[str, int] = {}
    for name, p in model.named_parameters():
        built[_category(name)] = built.get(_category(name), 0) + p.numel()
    formula = parameter_counts(cfg)
    for key, value in built.items():
        assert value == formula[key], key
    assert sum(built.values()) == formula["total"]
    # The hand count, each figure with the half-unit of its last printed digit.
    hand = {"total": (0.9166e12, 0.00005e12), "experts": (908.4e9, 0.05e9), "attention": (6.70e9, 0.005e9),
            "embedding": (1.27e9, 0.005e9), "routers": (0.20e9, 0.005e9), "active": (22.36e9, 0.005e9),
            "active_no_embedding": (21.09e9, 0.005e9)}
    for key, (expected, half_unit) in hand.items():
        assert formula[key] == pytest.approx(expected, abs=half_unit), key
    for key in ("total", "active", "active_no_embedding"):
        assert formula[key] == pytest.approx(hand[key][0], rel=1e-3), key


def test_fope_keeps_45_frequencies_for_intern_s1_pro():
    from scimoe.model.rotary import kept_frequency_count

    assert kept_frequency_count(128, 5e6, 262144) == 45


def test_tiny_preset_counts_match_the_built_model():
    cfg = _preset("tiny")
    model = build_model(cfg, seed=0)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(cfg)["total"]
