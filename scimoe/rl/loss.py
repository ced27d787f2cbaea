"""GRPO's math: group-normalised advantages, the clipped importance-ratio surrogate and its variants, KL
estimators and aggregation. Tested against hand computations in `python -m pytest tests/rl/test_grpo_math.py`.

Advantages, for G completions of a prompt with rewards r (computed in float64): A_i = r_i − mean(r), divided
by std(r) + eps when `scale_std` (`std`: `population`, the default, or `sample`, verl's and TRL's, which is
the population one times sqrt(G/(G−1)): a constant per group size, i.e. a learning-rate factor). A group whose
rewards are all equal gets A = 0 exactly: in float32, mean and std of eight rewards of 1.2 are off by an ulp
and the quotient was ±0.1, a full-size update from nothing.

Per token, ratio ρ = exp(logp − logp_old): loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), with
- dual clip (`clip_ratio_c` = c > 1, negative advantages only): loss = min(loss, −c·A), so a huge ratio on a
  bad token cannot blow the loss up (Ye et al. 2020);
- sequence-level ratio (GSPO, Zheng et al. 2025): s_i = exp(mean over the sequence's tokens of (logp − old)),
  loss_i = −min(s_i·A_i, clip(s_i)·A_i) per sequence, averaged over sequences;
- truncated importance sampling (`tis_weight`, Yao et al. 2025): each token's loss times
  w = min(π_old / π_rollout, cap), when the sampler's log-probs differ from the trainer's;
- KL to the frozen reference: k1 = logp − logp_ref, k2 = ½(logp − logp_ref)², k3 = e^(ref−logp) − (ref−logp) − 1.
Aggregation: `token_mean` (every completion token of the batch), `seq_mean` (per sequence, then over
sequences), `constant_length` (Dr. GRPO, Liu et al. 2025: the token sum over sequences × a constant length,
so long and short answers weigh their tokens alike and no length bias enters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token_mean", "seq_mean", "constant_length")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, std: str = "population",
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [B, G] → float64 advantages [B, G]; groups of equal rewards → exactly 0."""
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        if std not in ("population", "sample"):
            raise ValueError(f"config error at 'grpo.std': must be population or sample, got '{std}'")
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=std == "sample") + eps)
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(centred), centred)


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
    """Share of completion tokens (sequences, with the sequence-level ratio) whose objective the clip changed."""
    kl: float


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, length: int | None = None) -> torch.Tensor:
    """Mean of per-token `values` [N, T] over the `mask`ed tokens as `mode` says (`length`: Dr. GRPO's constant)."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp_min(1)
    if mode == "seq_mean":
        return ((values * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    if mode == "constant_length":
        return (values * mask).sum() / (values.shape[0] * (length or values.shape[1]))
    raise ValueError(f"config error at 'grpo.aggregation': must be one of {AGGREGATIONS}, got '{mode}'")


def tis_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(π_old / π_rollout, cap) per token (no gradient)."""
    return (old_logp - rollout_logp).exp().clamp(max=cap).detach()


def _surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float,
               clip_ratio_c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, whether the clips changed it) for ratios and advantages of the same shape."""
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    changed = clipped < unclipped
    if clip_ratio_c:
        cap = -clip_ratio_c * adv
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        changed = changed | dual
    return loss, changed


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, aggregation: str = "token_mean",
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                clip_ratio_c: float = 0.0, ratio_level: str = "token", weights: torch.Tensor | None = None,
                length: int | None = None) -> PolicyLoss:
    """logp, old_logp, ref_logp, mask, weights: [N, T] per completion token; advantages [N] per sequence."""
    adv = advantages.to(logp.dtype)
    maskf = mask.to(logp.dtype)
    if ratio_level == "sequence":
        log_s = ((logp - old_logp) * maskf).sum(1) / maskf.sum(1).clamp_min(1)
        per_seq, changed = _surrogate(log_s.exp(), adv, clip_low, clip_high, clip_ratio_c)
        loss = per_seq.mean()
        clip_fraction = float(changed.float().mean())
    elif ratio_level == "token":
        per_token, changed = _surrogate((logp - old_logp).exp(), adv[:, None].expand_as(logp), clip_low, clip_high,
                                        clip_ratio_c)
        if weights is not None:
            per_token = per_token * weights
        loss = aggregate(per_token, mask, aggregation, length)
        clip_fraction = float((changed & mask).sum() / mask.sum().clamp_min(1))
    else:
        raise ValueError(f"config error at 'grpo.ratio_level': must be token or sequence, got '{ratio_level}'")
    kl = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and kl_coef:
        kl_tokens = kl_estimate(logp, ref_logp, kl_estimator)
        loss = loss + kl_coef * aggregate(kl_tokens, mask, "seq_mean" if ratio_level == "sequence" else aggregation,
                                          length)
        kl = aggregate(kl_tokens.detach(), mask, "token_mean")
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, kl=float(kl))
