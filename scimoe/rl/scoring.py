"""Scoring rollouts with a policy in any layout: the batch a set of rollouts makes, the log-probs of its
sampled tokens, and GRPO's loss on them, as heads that scimoe/train/step.py's `forward_with_head` runs on the
last pipeline stage's (vocabulary-sharded) logits.

Tested by `python -m pytest tests/rl/test_generate.py tests/distributed/test_generation.py`.
"""
from __future__ import annotations

import torch

from scimoe.rl.generate import Rollout
from scimoe.rl.loss import policy_loss


def rollout_batch(rollouts: list[Rollout], replay: bool, multiple_of: int = 1) -> dict:
    """Every rollout's sequences as one batch: inputs (all tokens but the last, right-padded to a multiple of
    `multiple_of` positions for sequence parallelism; padding comes after every scored position, so causal
    attention keeps it out of them), the sampled tokens as targets, and the recorded experts to replay."""
    width = max(r.tokens.shape[1] for r in rollouts)
    prompt = rollouts[0].prompt_len
    tokens = torch.cat([_pad_right(r.tokens, width, r.tokens[:, -1:]) for r in rollouts])
    inputs = tokens[:, :-1]
    length = -(-inputs.shape[1] // multiple_of) * multiple_of
    experts = None
    if replay:  # padding has no recorded experts: −1 lets the router choose for it
        free = torch.full((1, 1, 1), -1, dtype=torch.long, device=inputs.device)
        experts = [None if rollouts[0].experts[j] is None else
                   _pad_right(torch.cat([_pad_right(r.experts[j], width - 1, free) for r in rollouts]), length, free)
                   for j in range(len(rollouts[0].experts))]
    inputs = _pad_right(inputs, length, inputs[:, -1:])
    positions = torch.arange(length, device=inputs.device).expand_as(inputs)
    return {"input_ids": inputs, "positions": positions, "replay": experts, "targets": tokens[:, prompt:],
            "prompt_len": prompt}


def completions(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, sampling log-probs) [N, T] of every rollout's completion tokens, right-padded alike."""
    width = max(r.completion_mask.shape[1] for r in rollouts)
    no = torch.zeros(1, 1, dtype=torch.bool, device=rollouts[0].tokens.device)
    mask = torch.cat([_pad_right(r.completion_mask, width, no) for r in rollouts])
    logp = torch.cat([_pad_right(r.logprobs, width, torch.zeros_like(r.logprobs[:, :1])) for r in rollouts])
    return mask, logp


def _pad_right(t: torch.Tensor, width: int, fill: torch.Tensor | None) -> torch.Tensor:
    """`t` [n, w, ...] to width `width` along dim 1, repeating `fill` ([1 or n, 1, ...])."""
    if t.shape[1] >= width:
        return t
    return torch.cat([t, fill.to(t.dtype).expand(t.shape[0], width - t.shape[1], *t.shape[2:])], dim=1)


def _target_logprobs(comm, logits: torch.Tensor, batch: dict, temperature: float):
    p, n = batch["prompt_len"], batch["targets"].shape[1]
    return comm.target_logprobs(logits[:, p - 1:p - 1 + n] / temperature, batch["targets"])


def logprob_head(comm, temperature: float):
    """Head for a no-grad scoring pass: the sampled tokens' log-probs and entropies."""
    def head(logits: torch.Tensor, batch: dict):
        logp, entropy = _target_logprobs(comm, logits, batch, temperature)
        return logp.sum() * 0.0, {"logp": logp.detach(), "entropy": entropy}
    return head


def policy_head(comm, temperature: float, grpo, old: torch.Tensor, ref: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None, share):
    """Head for the update: this rank's share (`share`, a number or a 0-d tensor) of GRPO's loss."""
    def head(logits: torch.Tensor, batch: dict):
        logp, entropy = _target_logprobs(comm, logits, batch, temperature)
        result = policy_loss(logp, old, advantages, mask, grpo.clip_low, grpo.clip_high, grpo.aggregation, ref,
                             grpo.kl_coef, grpo.kl_estimator, grpo.clip_ratio_c, grpo.ratio_level, weights,
                             grpo.max_new_tokens)
        return result.loss * share, {"loss": float(result.loss.detach()), "clip_fraction": result.clip_fraction,
                                     "kl": result.kl, "entropy_sum": float((entropy * mask).sum())}
    return head
