"""Sampling from the policy with a KV cache, recording each token's experts for router replay.

Tested by `python -m pytest tests/rl/test_generate.py`. `sample` draws `n` completions of one prompt
(temperature, top-k, then top-p filtering; defaults 0.8 / 50 / 0.95 as Intern-S1-Pro recommends) until
each has produced EOS or `max_new` tokens. With `use_cache=False` every step re-runs the whole sequence
(the baseline of benchmarks/rollout.py); both give the same tokens for the same generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from scimoe.model import MoETransformer


@dataclass
class Rollout:
    """`n` sequences of one prompt."""

    tokens: torch.Tensor
    """[n, P + N] prompt followed by the sampled tokens (EOS-padded after a sequence stops)."""
    prompt_len: int
    completion_mask: torch.Tensor
    """[n, N] True for sampled tokens up to and including the first EOS."""
    logprobs: torch.Tensor
    """[n, N] log-probability of each sampled token under the (temperature-scaled) sampling policy."""
    experts: list[torch.Tensor]
    """Per MoE layer, [n, P + N − 1, K] experts each input token was routed to (router replay)."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits, then the smallest set whose probability reaches top_p; others → −inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model: MoETransformer, prompt: list[int], n: int, max_new: int, eos_id: int, temperature: float = 0.8,
           top_k: int = 50, top_p: float = 0.95, generator: torch.Generator | None = None,
           use_cache: bool = True, everyone_done: Callable[[bool], bool] | None = None) -> Rollout:
    """`everyone_done(mine)`: whether all ranks that must step together (expert parallelism: every forward
    is a collective) are done; by default this rank alone decides."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p = len(prompt)
    tokens = torch.tensor(prompt, device=device).repeat(n, 1)
    caches = [{} for _ in model.layers] if use_cache else None
    routed: list[list[torch.Tensor]] = []
    logprobs, done = [], torch.zeros(n, dtype=torch.bool, device=device)
    step_input, positions = tokens, torch.arange(p, device=device).expand(n, p)
    for step in range(max_new):
        out = model(step_input, positions, kv_cache=caches)
        new_routes = [a.indices.view(n, -1, a.indices.shape[-1]) for a in out.moe]
        if use_cache:
            routed = [r + [x] for r, x in zip(routed, new_routes)] if routed else [[x] for x in new_routes]
        else:
            routed = [[x] for x in new_routes]  # the full sequence each time: keep the latest
        logits = out.logits[:, -1].float() / temperature
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
        choice = torch.where(done, torch.full_like(choice, eos_id), choice)
        logprobs.append(logits.log_softmax(-1).gather(-1, choice[:, None]).squeeze(-1))
        tokens = torch.cat((tokens, choice[:, None]), dim=1)
        done = done | (choice == eos_id)
        if step == max_new - 1 or (everyone_done or bool)(bool(done.all())):
            break
        if use_cache:
            step_input, positions = choice[:, None], torch.full((n, 1), p + step, device=device)
        else:
            step_input, positions = tokens, torch.arange(tokens.shape[1], device=device).expand(n, -1)
    completion = tokens[:, p:]
    is_eos = completion == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((n,), completion.shape[1], device=device))
    mask = torch.arange(completion.shape[1], device=device)[None] <= first_eos[:, None]
    experts = [torch.cat(parts, dim=1)[:, : tokens.shape[1] - 1] for parts in routed]
    model.train(was_training)
    return Rollout(tokens=tokens, prompt_len=p, completion_mask=mask, logprobs=torch.stack(logprobs, 1), experts=experts)
