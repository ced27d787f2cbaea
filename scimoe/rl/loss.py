"""GRPO's math: group-normalised advantages, the clipped importance-ratio surrogate, KL estimators and
token aggregation. Tested against hand computations in `tests/rl/test_grpo_math.py`.

For G completions of a prompt with rewards r: A_i = r_i − mean(r), divided by std(r) + eps when
`scale_std` (groups with identical rewards get A = 0, no division by zero). Per token, with ratio
ρ = exp(logp − logp_old): loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL, where KL to the
frozen reference is k1 = logp − logp_ref, k2 = ½(logp − logp_ref)², or k3 = e^(ref−logp) − (ref−logp) − 1
(Schulman's unbiased, always ≥ 0 estimator). `token_mean` averages over every completion token of the
batch (long answers weigh more), `seq_mean` averages within each sequence, then over sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [B, G] → advantages [B, G]."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    diff = ref_logp - logp
    if kind == "k1":
        return -diff
    if kind == "k2":
        return 0.5 * diff.pow(2)
    if kind == "k3":
        return diff.exp() - diff - 1
    raise ValueError(f"config error at 'grpo.kl_estimator': must be k1, k2 or k3, got '{kind}'")


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: float
    kl: float


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp_min(1)
    if mode == "seq_mean":
        return ((values * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    raise ValueError(f"config error at 'grpo.aggregation': must be token_mean or seq_mean, got '{mode}'")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, aggregation: str = "token_mean",
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3") -> PolicyLoss:
    """logp, old_logp, ref_logp, mask: [N, T] per completion token; advantages [N] per sequence."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None].to(logp.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and kl_coef:
        kl_tokens = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + kl_coef * kl_tokens
        kl = aggregate(kl_tokens.detach(), mask, "token_mean")
    with torch.no_grad():
        was_clipped = (clipped < unclipped) & mask  # the clip changed the objective for this token
        clip_fraction = float(was_clipped.sum() / mask.sum().clamp_min(1))
    return PolicyLoss(loss=aggregate(per_token, mask, aggregation), clip_fraction=clip_fraction, kl=float(kl))
