"""GRPO math against hand computations: `python -m pytest tests/rl/test_grpo_math.py`."""
from __future__ import annotations

import math

import pytest
import torch

from scimoe.rl.loss import aggregate, group_advantages, kl_estimate, policy_loss


def test_group_advantages_with_and_without_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    centred = group_advantages(rewards, scale_std=False)
    assert centred.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    scaled = group_advantages(rewards, scale_std=True)
    # group 1: mean 0.5, population std 0.5 → ±1; group 2: identical rewards → 0, not NaN
    assert scaled[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert scaled[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))  # ratios 1.5, 0.5, 1.1, 0.9
    mask = torch.ones(1, 4, dtype=torch.bool)
    positive = policy_loss(logp, old, torch.tensor([2.0]), mask, clip_low=0.2, clip_high=0.28)
    # A=2: min(ρA, clip(ρ)A) = min(3, 2.56), min(1, 1.6), min(2.2, 2.2), min(1.8, 1.8) → 2.56, 1, 2.2, 1.8
    assert float(positive.loss) == pytest.approx(-(2.56 + 1.0 + 2.2 + 1.8) / 4, rel=1e-6)
    assert positive.clip_fraction == 0.25  # only ρ = 1.5 was clipped (the objective took 1.28·A)
    negative = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A=−1: min(−1.5, −1.28), min(−0.5, −0.8), min(−1.1, −1.1), min(−0.9, −0.9) → −1.5, −0.8, −1.1, −0.9
    assert float(negative.loss) == pytest.approx((1.5 + 0.8 + 1.1 + 0.9) / 4, rel=1e-6)
    assert negative.clip_fraction == 0.25  # ρ = 0.5 clipped to 0.8


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(0.25) - math.log(0.5)  # ref − logp = −ln 2
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(-d)
    assert float(kl_estimate(logp, ref, "k2")) == pytest.approx(0.5 * d * d)
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(math.exp(d) - d - 1)  # 0.5 − (−0.693) − 1
    assert float(kl_estimate(ref, ref, "k3")) == 0.0
    with pytest.raises(ValueError, match="grpo.kl_estimator"):
        kl_estimate(logp, ref, "k4")


def test_token_mean_and_sequence_mean_differ_as_defined():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate(values, mask, "token_mean")) == pytest.approx((4 + 4) / 5)
    assert float(aggregate(values, mask, "seq_mean")) == pytest.approx((1 + 4) / 2)


def test_kl_penalty_enters_the_loss():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    base = policy_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, 0.2)
    with_kl = policy_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, 0.2, ref_logp=ref, kl_coef=0.1, kl_estimator="k1")
    assert float(base.loss) == 0.0
    assert float(with_kl.loss) == pytest.approx(0.1 * math.log(2) / 2) and with_kl.kl == pytest.approx(math.log(2) / 2)
