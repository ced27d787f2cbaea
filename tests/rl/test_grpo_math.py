"""GRPO math against hand computations: `python -m pytest tests/rl/test_grpo_math.py`."""
from __future__ import annotations

import math

import pytest
import torch

from scimoe.rl.loss import aggregate, group_advantages, kl_estimate, policy_loss, tis_weight


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


@pytest.mark.parametrize("reward", [1.2, 0.2, 0.7, 1.0 + 0.2])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(reward):
    """In float32, 1.0 + 0.2 is 1.2000000477 and eight of them have an ulp-sized mean error and std: the old
    formula gave every completion A ≈ +0.107. Each is exactly 0 now, scaled or not, both std kinds."""
    rewards = torch.full((3, 8), reward, dtype=torch.float32)
    rewards[1] = torch.tensor(reward, dtype=torch.float32) * torch.ones(8)
    for scale_std in (True, False):
        for std in ("population", "sample"):
            assert torch.equal(group_advantages(rewards, scale_std, std), torch.zeros(3, 8, dtype=torch.float64))


def test_sample_std_is_the_population_one_times_sqrt_g_over_g_minus_one():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    population = group_advantages(rewards, True, "population")
    sample = group_advantages(rewards, True, "sample")
    # mean 0.5; population std 0.5, sample std sqrt(1/3) = 0.5774
    assert population[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert sample[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_dual_clip_caps_the_loss_of_negative_advantages_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5]]))  # ratios 5, 2, 0.5
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain = policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.28)
    dual = policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.28, clip_ratio_c=3.0)
    # A = −1: −min(ρA, clip(ρ)A) = max(5, 1.28), max(2, 1.28), max(0.5, 0.8) = 5, 2, 0.8; dual: min(·, 3·1)
    assert float(plain.loss) == pytest.approx((5 + 2 + 0.8) / 3, rel=1e-6)
    assert float(dual.loss) == pytest.approx((3 + 2 + 0.8) / 3, rel=1e-6)
    assert dual.clip_fraction == pytest.approx(2 / 3)  # ρ = 5 by the dual clip, ρ = 0.5 by the ordinary one
    positive = policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.28, clip_ratio_c=3.0)
    assert float(positive.loss) == pytest.approx(-(1.28 + 1.28 + 0.5) / 3, rel=1e-6)  # untouched for A > 0


def test_sequence_level_ratio_by_hand():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.21, 1.0], [1.0, 0.64]]))  # geometric means: 1.1 and 0.8
    mask = torch.tensor([[True, True], [True, True]])
    out = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.05, 0.05, ratio_level="sequence")
    # seq 1: s = 1.1, A = 1: −min(1.1, 1.05) = −1.05; seq 2: s = 0.8, A = −1: −min(−0.8, −0.95) = 0.95
    assert float(out.loss) == pytest.approx((-1.05 + 0.95) / 2, rel=1e-6) and out.clip_fraction == 1.0
    logp = logp.clone().requires_grad_()
    policy_loss(logp, old, torch.tensor([1.0, 1.0]), mask, 0.5, 0.5, ratio_level="sequence").loss.backward()
    # unclipped: d/dlogp_t of −s/N = −s · (1/|y|) / N: every token of a sequence gets the same gradient
    assert logp.grad[0].tolist() == pytest.approx([-1.1 / 2 / 2] * 2, rel=1e-5)


def test_constant_length_normalisation_by_hand():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    # Dr. GRPO: (4 + 4) / (2 sequences × 8 tokens), whatever each sequence's own length
    assert float(aggregate(values, mask, "constant_length", length=8)) == pytest.approx(8 / 16)


def test_truncated_importance_weights_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.1]]))
    rollout = torch.log(torch.tensor([[0.25, 0.5, 0.5]]))  # the sampler's probabilities differ
    w = tis_weight(old, rollout, cap=1.5)
    assert w[0].tolist() == pytest.approx([1.5, 1.0, 0.2], rel=1e-6)  # 2 capped at 1.5, 1, 0.2
    logp, mask = old.clone(), torch.ones(1, 3, dtype=torch.bool)
    out = policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2, weights=w)
    assert float(out.loss) == pytest.approx(-(1.5 + 1.0 + 0.2) / 3, rel=1e-6)  # ratio 1: loss −A·w per token
